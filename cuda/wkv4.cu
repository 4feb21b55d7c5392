// RWKV-4 WKV recurrence: bf16 inputs and output, float32 arithmetic, state in and out, any T.
//
// The recurrence for one (batch b, channel c):
//   State (A, Bs, P) stands for the sums (A e^P, Bs e^P), numerator and denominator of wkv.
//   For token t with k = k_t, v = v_t, log-decay w <= 0 and bonus u:
//     read out:  o  = max(P, u + k);   e1 = e^(P - o);       e2 = e^(u + k - o)
//                y_t = (e1 A + e2 v) / den,   den = e1 Bs + e2
//     take in:   o2 = max(P + w, k);   f1 = e^(P + w - o2);  f2 = e^(k - o2)
//                A <- f1 A + f2 v;   Bs <- f1 Bs + f2;   P <- o2
//   Every exponent is <= 0, so nothing overflows whatever k is. P_T, the final exponent, is
//   max(P_0 + T w, max_t k_t + (T-1-t) w); the kernel also returns which token set it (-1: P_0), so the
//   caller can differentiate it.
//
// Parallel over time. A (b, c) pair alone is one sequential chain of T steps, and B * C chains do not
// fill a GPU, so T is cut into groups of G chunks of kChunk tokens, one thread per (b, c, group):
//   forward   summarize   each group but the last from the empty state: its (A, Bs, P) and argmax
//             carry       per (b, c), sequential over groups: the state at each group's start
//             outputs     each group from its start state: y, the state before every chunk
//                         (checkpoints for the backward), and from the last group the final state
// The decay over a whole group is the scalar e^(L w), so carrying is one combine per group.
// A block is 128 channels of one (b, group). The chunks of k, v and dy go through shared memory, moved
// 16 bytes per thread (whole row segments) and fetched one chunk ahead of the one being computed; y, dk
// and dv leave the same way.
//
// Backward. The outputs do not depend on which scale P a state is kept at, so the gradient is taken
// with every P (and o, o2) held fixed. GA, GB are dL/dA, dL/dBs at the current scale; they start as
// the final state's (g_aa, g_bb) and walk back through each token (state (A, Bs, P) before it,
// dy = dL/dy_t):
//     dv_t = f2 GA + dy e2 / den
//     dk_t = f2 (GA v + GB) + dy e2 (v - y_t) / den          du += dy e2 (v - y_t) / den
//     dw  += f1 (GA A + GB Bs)
//     GA <- f1 GA + dy e1 / den;   GB <- f1 GB - dy y_t e1 / den
// GA at a group's start is D GA_end + sum_t (prod_{s<t} f1_s) dy_t e1_t / den_t with D the product of
// every f1 in the group (GB alike), which a forward walk over the group gives without the end value:
//   backward  grad_summarize   each group but the first: (sum for GA, sum for GB, D)
//             grad_carry       per (b, c), sequential over groups from the last: (GA, GB) at each group's end
//             gradients        each group walked back from its end, a chunk at a time: the chunk's states
//                              recomputed from its checkpoint into registers; dk, dv, and per-group sums
//                              of dw and du, which `reduce` adds up per (b, c)
// After token 0, (GA, GB) = dL/d(aa0, bb0). The gradient through P_T itself (g_p, formed by the caller)
// is added to dk at the token that set it; its w and P_0 parts are the caller's.

#ifndef WKV_KERNELS_ONLY  // defined by `make cuda-check`: compile the kernels alone, fast
#include <torch/extension.h>

// c10's stream header, not ATen/cuda/CUDAContext.h: that one needs the cuSPARSE/cuBLAS headers,
// which a minimal CUDA toolkit does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace wkv4 {

using bf16 = __nv_bfloat16;

// Tokens between checkpoints. The backward holds a chunk's states in registers (three floats per
// token), so this trades checkpoint memory (3 floats per (b, c) per chunk) against registers.
// rwkv_train/ops/wkv4_cuda.py allocates the checkpoint buffer with the same value.
constexpr int kChunk = 16;
// Channels per block, one per thread. A block's threads share (b, group) and walk the same chunks.
constexpr int kThreads = 128;
// The exponent of the empty state: every token's exponent is larger.
constexpr float kEmpty = -1e38f;

// How T is cut: groups of `group` chunks (the last may be shorter), all but the last full.
// vec: every [B, T, C] row can be moved 8 bf16 (16 bytes) at a time (C % 8 == 0, aligned pointers).
struct Plan {
  int B, T, C, n_chunks, group, n_groups;
  bool vec;
  __device__ int first_chunk(int g) const { return g * group; }
  __device__ int end_chunk(int g) const { return min(n_chunks, (g + 1) * group); }
  __device__ int end_token(int g) const { return min(T, (g + 1) * group * kChunk); }
};

// The thread's (b, c) pair: blocks are (channel tile, group, b), threads the tile's channels.
struct Lane {
  int64_t bc;
  int b, c, c0;
  bool valid;  // c < C; the other threads of a partial tile only help move tiles
  __device__ explicit Lane(const Plan& p) {
    b = blockIdx.z;
    c0 = blockIdx.x * kThreads;
    c = c0 + threadIdx.x;
    valid = c < p.C;
    bc = static_cast<int64_t>(b) * p.C + c;
  }
};

// Offset of slot s of entry j (chunk or group) in a [B, n, slots, C] buffer.
__device__ __forceinline__ int64_t slot_at(const Plan& p, int b, int j, int s, int n, int slots) {
  return ((static_cast<int64_t>(b) * n + j) * slots + s) * p.C;
}

__device__ __forceinline__ int64_t checkpoint_at(const Plan& p, int b, int j, int s) {
  return slot_at(p, b, j, s, p.n_chunks, 3);
}

// ---- chunk tiles: [kChunk tokens, kThreads channels] of a [B, T, C] bf16 stream ------------------------
// Moved between global and shared memory 16 bytes per thread per access, so a warp reads or writes
// whole 256-byte row segments; each thread then works on its own column in shared memory.

constexpr int kRowVecs = kThreads / 8;                 // 16-byte pieces per tile row
constexpr int kVecsPerThread = kChunk * kRowVecs / kThreads;

struct TileIndex {
  int row, col;  // token in the chunk, first of 8 channels in the tile
  __device__ explicit TileIndex(int r) {
    const int q = threadIdx.x + r * kThreads;
    row = q / kRowVecs;
    col = (q % kRowVecs) * 8;
  }
};

union Piece {
  uint4 vec;
  bf16 x[8];
};

// One stream's chunk in registers, on its way into shared memory: loaded one chunk ahead, so the
// loads are in flight while the current chunk computes.
struct TileLoad {
  Piece part[kVecsPerThread];

  __device__ void get(const bf16* __restrict__ x, const Plan& p, const Lane& l, int t0, int t_end) {
#pragma unroll
    for (int r = 0; r < kVecsPerThread; ++r) {
      const TileIndex at(r);
      const int t = t0 + at.row, c = l.c0 + at.col;
      const bf16* src = x + (static_cast<int64_t>(l.b) * p.T + t) * p.C + c;
      if (t < t_end && p.vec && c < p.C) {
        part[r].vec = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) part[r].x[e] = t < t_end && c + e < p.C ? src[e] : __float2bfloat16(0.0f);
      }
    }
  }

  __device__ void put(bf16* __restrict__ tile) const {
#pragma unroll
    for (int r = 0; r < kVecsPerThread; ++r) {
      const TileIndex at(r);
      *reinterpret_cast<uint4*>(tile + at.row * kThreads + at.col) = part[r].vec;
    }
  }
};

// A chunk of output, written by each thread into its column of `tile`, then stored row-wise.
__device__ __forceinline__ void store_tile(const bf16* __restrict__ tile, bf16* __restrict__ x, const Plan& p,
                                           const Lane& l, int t0, int t_end) {
#pragma unroll
  for (int r = 0; r < kVecsPerThread; ++r) {
    const TileIndex at(r);
    const int t = t0 + at.row, c = l.c0 + at.col;
    if (t >= t_end || c >= p.C) continue;
    Piece piece;
    piece.vec = *reinterpret_cast<const uint4*>(tile + at.row * kThreads + at.col);
    bf16* dst = x + (static_cast<int64_t>(l.b) * p.T + t) * p.C + c;
    if (p.vec) {
      *reinterpret_cast<uint4*>(dst) = piece.vec;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (c + e < p.C) dst[e] = piece.x[e];
      }
    }
  }
}

__device__ __forceinline__ float column(const bf16* __restrict__ tile, int i) {
  return __bfloat162float(tile[i * kThreads + threadIdx.x]);
}

// y_t and the weights it was formed with, read from the state before token t.
struct Readout {
  float e1, e2, inv_den, y;
};

// One of each pair of weights is e^0 = 1, so each pair costs one exponential.
__device__ __forceinline__ Readout read_out(float A, float Bs, float P, float u, float k, float v) {
  const float uk = u + k;
  const float smaller = __expf(-fabsf(P - uk));  // e^(min - max) of the exponents P and u + k
  const bool state_larger = P >= uk;
  Readout r;
  r.e1 = state_larger ? 1.0f : smaller;
  r.e2 = state_larger ? smaller : 1.0f;
  r.inv_den = 1.0f / (r.e1 * Bs + r.e2);
  r.y = (r.e1 * A + r.e2 * v) * r.inv_den;
  return r;
}

// The weights of the state update: the state decays one step, then takes token t in.
struct TakeIn {
  float f1, f2, p;
  bool sets_max;  // token t's exponent is the new P (the earlier one wins a tie)
};

__device__ __forceinline__ TakeIn take_in(float P, float w, float k) {
  const float kept = P + w;
  const float smaller = __expf(-fabsf(kept - k));
  const bool sets_max = k > kept;
  return {sets_max ? smaller : 1.0f, sets_max ? 1.0f : smaller, sets_max ? k : kept, sets_max};
}

struct State {
  float A, Bs, P;
  __device__ void take(const TakeIn& d, float v) {
    A = d.f1 * A + d.f2 * v;
    Bs = d.f1 * Bs + d.f2;
    P = d.p;
  }
};

// Threads past C compute on this harmless state (and w = u = 0) and write nothing.
constexpr State kIdle{0.0f, 1.0f, 0.0f};

__device__ __forceinline__ State load_checkpoint(const float* __restrict__ cp, const Plan& p, const Lane& l, int j) {
  if (!l.valid) return kIdle;
  return {cp[checkpoint_at(p, l.b, j, 0) + l.c], cp[checkpoint_at(p, l.b, j, 1) + l.c],
          cp[checkpoint_at(p, l.b, j, 2) + l.c]};
}

__device__ __forceinline__ void store_checkpoint(float* __restrict__ cp, const Plan& p, const Lane& l, int j,
                                                 const State& s) {
  if (!l.valid) return;
  cp[checkpoint_at(p, l.b, j, 0) + l.c] = s.A;
  cp[checkpoint_at(p, l.b, j, 1) + l.c] = s.Bs;
  cp[checkpoint_at(p, l.b, j, 2) + l.c] = s.P;
}

__device__ __forceinline__ float per_channel(const float* __restrict__ x, const Lane& l) {
  return l.valid ? x[l.c] : 0.0f;
}

// ---- forward --------------------------------------------------------------------------------------

// Group g (< n_groups - 1) from the empty state: its (A, Bs, P) into sums [B, n_groups, 3, C] and the
// token that set its P into sum_arg [B, n_groups, C].
__global__ void __launch_bounds__(kThreads) summarize_kernel(Plan p, const float* __restrict__ w,
                                                             const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                             float* __restrict__ sums, int* __restrict__ sum_arg) {
  __shared__ __align__(16) bf16 sk[kChunk * kThreads], sv[kChunk * kThreads];
  const Lane l(p);
  const int g = blockIdx.y;
  const float wc = per_channel(w, l);
  const int t_end = p.end_token(g), j0 = p.first_chunk(g), j1 = p.end_chunk(g);
  State s{0.0f, 0.0f, kEmpty};
  int arg = -1;
  TileLoad fk, fv;
  fk.get(k, p, l, j0 * kChunk, t_end), fv.get(v, p, l, j0 * kChunk, t_end);
  for (int j = j0; j < j1; ++j) {
    const int t0 = j * kChunk;
    __syncthreads();
    fk.put(sk), fv.put(sv);
    __syncthreads();
    if (j + 1 < j1) fk.get(k, p, l, t0 + kChunk, t_end), fv.get(v, p, l, t0 + kChunk, t_end);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (t0 + i < t_end) {
        const TakeIn d = take_in(s.P, wc, column(sk, i));
        if (d.sets_max) arg = t0 + i;
        s.take(d, column(sv, i));
      }
    }
  }
  if (!l.valid) return;
  sums[slot_at(p, l.b, g, 0, p.n_groups, 3) + l.c] = s.A;
  sums[slot_at(p, l.b, g, 1, p.n_groups, 3) + l.c] = s.Bs;
  sums[slot_at(p, l.b, g, 2, p.n_groups, 3) + l.c] = s.P;
  sum_arg[(static_cast<int64_t>(l.b) * p.n_groups + g) * p.C + l.c] = arg;
}

// Per (b, c): the state at each group's start (its first checkpoint), and in arg [B, C] the token that
// set P at the last group's start (-1: P_0).
__global__ void carry_kernel(Plan p, const float* __restrict__ w, const float* __restrict__ aa0,
                             const float* __restrict__ bb0, const float* __restrict__ pp0,
                             const float* __restrict__ sums, const int* __restrict__ sum_arg,
                             float* __restrict__ checkpoints, int* __restrict__ arg) {
  const Lane l(p);
  if (!l.valid) return;
  const float decay = static_cast<float>(p.group * kChunk) * w[l.c];  // log-decay over a full group
  State s{aa0[l.bc], bb0[l.bc], pp0[l.bc]};
  int a = -1;
  for (int g = 0; g < p.n_groups; ++g) {
    store_checkpoint(checkpoints, p, l, p.first_chunk(g), s);
    if (g + 1 == p.n_groups) break;
    const float A = sums[slot_at(p, l.b, g, 0, p.n_groups, 3) + l.c];
    const float Bs = sums[slot_at(p, l.b, g, 1, p.n_groups, 3) + l.c];
    const float P = sums[slot_at(p, l.b, g, 2, p.n_groups, 3) + l.c];
    const float kept = s.P + decay;
    const float top = fmaxf(kept, P);
    if (P > kept) a = sum_arg[(static_cast<int64_t>(l.b) * p.n_groups + g) * p.C + l.c];
    const float f_kept = __expf(kept - top), f_new = __expf(P - top);
    s = {f_kept * s.A + f_new * A, f_kept * s.Bs + f_new * Bs, top};
  }
  arg[l.bc] = a;
}

// Group g from its start state: y, the other checkpoints of the group, and from the last group the
// final (aa, bb, pp) and the token that set pp (arg, read and rewritten).
__global__ void __launch_bounds__(kThreads) outputs_kernel(Plan p, const float* __restrict__ w,
                                                           const float* __restrict__ u, const bf16* __restrict__ k,
                                                           const bf16* __restrict__ v, float* __restrict__ checkpoints,
                                                           int* __restrict__ arg, bf16* __restrict__ y,
                                                           float* __restrict__ aa, float* __restrict__ bb,
                                                           float* __restrict__ pp) {
  __shared__ __align__(16) bf16 sk[kChunk * kThreads], sv[kChunk * kThreads], sy[kChunk * kThreads];
  const Lane l(p);
  const int g = blockIdx.y;
  const bool last = g + 1 == p.n_groups;
  const float wc = per_channel(w, l), uc = per_channel(u, l);
  const int t_end = p.end_token(g), j0 = p.first_chunk(g), j1 = p.end_chunk(g);
  State s = load_checkpoint(checkpoints, p, l, j0);
  int a = last && l.valid ? arg[l.bc] : -1;
  TileLoad fk, fv;
  fk.get(k, p, l, j0 * kChunk, t_end), fv.get(v, p, l, j0 * kChunk, t_end);
  for (int j = j0; j < j1; ++j) {
    const int t0 = j * kChunk;
    if (j != j0) store_checkpoint(checkpoints, p, l, j, s);
    __syncthreads();
    fk.put(sk), fv.put(sv);
    __syncthreads();
    if (j + 1 < j1) fk.get(k, p, l, t0 + kChunk, t_end), fv.get(v, p, l, t0 + kChunk, t_end);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (t0 + i < t_end) {
        const float kt = column(sk, i), vt = column(sv, i);
        sy[i * kThreads + threadIdx.x] = __float2bfloat16(read_out(s.A, s.Bs, s.P, uc, kt, vt).y);
        const TakeIn d = take_in(s.P, wc, kt);
        if (d.sets_max) a = t0 + i;
        s.take(d, vt);
      }
    }
    __syncthreads();
    store_tile(sy, y, p, l, t0, t_end);
  }
  if (last && l.valid) {
    aa[l.bc] = s.A;
    bb[l.bc] = s.Bs;
    pp[l.bc] = s.P;
    arg[l.bc] = a;
  }
}

// ---- backward -------------------------------------------------------------------------------------

// Group g (>= 1) walked forward from its start: the part of (GA, GB) at its start that comes from its
// own dy, and D, into gsums [B, n_groups, 3, C].
__global__ void __launch_bounds__(kThreads) grad_summarize_kernel(Plan p, const float* __restrict__ w,
                                                                  const float* __restrict__ u,
                                                                  const bf16* __restrict__ k,
                                                                  const bf16* __restrict__ v,
                                                                  const bf16* __restrict__ gy,
                                                                  const float* __restrict__ checkpoints,
                                                                  float* __restrict__ gsums) {
  __shared__ __align__(16) bf16 sk[kChunk * kThreads], sv[kChunk * kThreads], sg[kChunk * kThreads];
  const Lane l(p);
  const int g = blockIdx.y + 1;
  const float wc = per_channel(w, l), uc = per_channel(u, l);
  const int t_end = p.end_token(g), j0 = p.first_chunk(g), j1 = p.end_chunk(g);
  State s = load_checkpoint(checkpoints, p, l, j0);
  float GA = 0.0f, GB = 0.0f, D = 1.0f;  // D: product of f1 over the tokens walked
  TileLoad fk, fv, fg;
  fk.get(k, p, l, j0 * kChunk, t_end), fv.get(v, p, l, j0 * kChunk, t_end), fg.get(gy, p, l, j0 * kChunk, t_end);
  for (int j = j0; j < j1; ++j) {
    const int t0 = j * kChunk;
    __syncthreads();
    fk.put(sk), fv.put(sv), fg.put(sg);
    __syncthreads();
    if (j + 1 < j1) {
      fk.get(k, p, l, t0 + kChunk, t_end), fv.get(v, p, l, t0 + kChunk, t_end);
      fg.get(gy, p, l, t0 + kChunk, t_end);
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (t0 + i < t_end) {
        const float kt = column(sk, i), vt = column(sv, i);
        const Readout r = read_out(s.A, s.Bs, s.P, uc, kt, vt);
        const float ge = D * column(sg, i) * r.inv_den * r.e1;
        GA += ge;
        GB -= ge * r.y;
        const TakeIn d = take_in(s.P, wc, kt);
        D *= d.f1;
        s.take(d, vt);
      }
    }
  }
  if (!l.valid) return;
  gsums[slot_at(p, l.b, g, 0, p.n_groups, 3) + l.c] = GA;
  gsums[slot_at(p, l.b, g, 1, p.n_groups, 3) + l.c] = GB;
  gsums[slot_at(p, l.b, g, 2, p.n_groups, 3) + l.c] = D;
}

// Per (b, c), from the last group back: (GA, GB) at each group's end into gend [B, n_groups, 2, C].
__global__ void grad_carry_kernel(Plan p, const float* __restrict__ g_aa, const float* __restrict__ g_bb,
                                  const float* __restrict__ gsums, float* __restrict__ gend) {
  const Lane l(p);
  if (!l.valid) return;
  float GA = g_aa[l.bc], GB = g_bb[l.bc];
  for (int g = p.n_groups - 1; g >= 0; --g) {
    gend[slot_at(p, l.b, g, 0, p.n_groups, 2) + l.c] = GA;
    gend[slot_at(p, l.b, g, 1, p.n_groups, 2) + l.c] = GB;
    if (g == 0) break;
    const float D = gsums[slot_at(p, l.b, g, 2, p.n_groups, 3) + l.c];
    GA = D * GA + gsums[slot_at(p, l.b, g, 0, p.n_groups, 3) + l.c];
    GB = D * GB + gsums[slot_at(p, l.b, g, 1, p.n_groups, 3) + l.c];
  }
}

// Group g walked back from its end: dk, dv; the group's sums of dw and du into partial
// [B, n_groups, 2, C]; from group 0, dL/d(aa0, bb0). g_p [B, C] joins dk at token arg [B, C].
__global__ void __launch_bounds__(kThreads) gradients_kernel(Plan p, const float* __restrict__ w,
                                                             const float* __restrict__ u, const bf16* __restrict__ k,
                                                             const bf16* __restrict__ v,
                                                             const float* __restrict__ checkpoints,
                                                             const float* __restrict__ gend,
                                                             const int* __restrict__ arg,
                                                             const float* __restrict__ g_p,
                                                             const bf16* __restrict__ gy, float* __restrict__ partial,
                                                             bf16* __restrict__ gk, bf16* __restrict__ gv,
                                                             float* __restrict__ g_aa0, float* __restrict__ g_bb0) {
  __shared__ __align__(16) bf16 sk[kChunk * kThreads], sv[kChunk * kThreads], sg[kChunk * kThreads];
  __shared__ __align__(16) bf16 sdk[kChunk * kThreads], sdv[kChunk * kThreads];
  const Lane l(p);
  const int g = blockIdx.y;
  const float wc = per_channel(w, l), uc = per_channel(u, l);
  const int t_end = p.end_token(g), j0 = p.first_chunk(g), j1 = p.end_chunk(g);
  const int t_max = l.valid ? arg[l.bc] : -1;
  const float gp = l.valid ? g_p[l.bc] : 0.0f;
  float GA = l.valid ? gend[slot_at(p, l.b, g, 0, p.n_groups, 2) + l.c] : 0.0f;
  float GB = l.valid ? gend[slot_at(p, l.b, g, 1, p.n_groups, 2) + l.c] : 0.0f;
  float dw = 0.0f, du = 0.0f;
  TileLoad fk, fv, fg;
  const int t_last = (j1 - 1) * kChunk;
  fk.get(k, p, l, t_last, t_end), fv.get(v, p, l, t_last, t_end), fg.get(gy, p, l, t_last, t_end);
  for (int j = j1 - 1; j >= j0; --j) {
    const int t0 = j * kChunk;
    __syncthreads();
    fk.put(sk), fv.put(sv), fg.put(sg);
    __syncthreads();
    if (j > j0) {
      fk.get(k, p, l, t0 - kChunk, t_end), fv.get(v, p, l, t0 - kChunk, t_end);
      fg.get(gy, p, l, t0 - kChunk, t_end);
    }
    // Recompute the chunk from its checkpoint: the state before each token.
    State s = load_checkpoint(checkpoints, p, l, j);
    float As[kChunk], Bss[kChunk], Ps[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (t0 + i < t_end) {
        As[i] = s.A;
        Bss[i] = s.Bs;
        Ps[i] = s.P;
        s.take(take_in(s.P, wc, column(sk, i)), column(sv, i));
      }
    }
    // Walk the chunk backwards; (GA, GB) goes from the state after token t to the state before it.
#pragma unroll
    for (int i = kChunk - 1; i >= 0; --i) {
      if (t0 + i < t_end) {
        const float kt = column(sk, i), vt = column(sv, i);
        const Readout r = read_out(As[i], Bss[i], Ps[i], uc, kt, vt);
        const TakeIn d = take_in(Ps[i], wc, kt);
        const float gd = column(sg, i) * r.inv_den;       // dy / den
        const float g_bonus = gd * r.e2 * (vt - r.y);     // through e2 = e^(u + k - o)
        const float g_top = t0 + i == t_max ? gp : 0.0f;  // through P_T, at the token that set it
        sdv[i * kThreads + threadIdx.x] = __float2bfloat16(d.f2 * GA + gd * r.e2);
        sdk[i * kThreads + threadIdx.x] = __float2bfloat16(d.f2 * (GA * vt + GB) + g_bonus + g_top);
        du += g_bonus;
        dw += d.f1 * (GA * As[i] + GB * Bss[i]);
        GA = d.f1 * GA + gd * r.e1;
        GB = d.f1 * GB - gd * r.y * r.e1;
      }
    }
    __syncthreads();
    store_tile(sdk, gk, p, l, t0, t_end);
    store_tile(sdv, gv, p, l, t0, t_end);
  }
  if (!l.valid) return;
  partial[slot_at(p, l.b, g, 0, p.n_groups, 2) + l.c] = dw;
  partial[slot_at(p, l.b, g, 1, p.n_groups, 2) + l.c] = du;
  if (g == 0) {
    g_aa0[l.bc] = GA;
    g_bb0[l.bc] = GB;
  }
}

// Per (b, c): dw and du summed over the groups, in group order (deterministic).
__global__ void reduce_kernel(Plan p, const float* __restrict__ partial, float* __restrict__ gw,
                              float* __restrict__ gu) {
  const Lane l(p);
  if (!l.valid) return;
  float dw = 0.0f, du = 0.0f;
  for (int g = 0; g < p.n_groups; ++g) {
    dw += partial[slot_at(p, l.b, g, 0, p.n_groups, 2) + l.c];
    du += partial[slot_at(p, l.b, g, 1, p.n_groups, 2) + l.c];
  }
  gw[l.bc] = dw;
  gu[l.bc] = du;
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
  TORCH_CHECK(k.size(0) <= 65535, "wkv4 CUDA kernel: B must be at most 65535 (one grid row each), got k with shape ",
              k.sizes(), "; split the batch");
  return k.size(0) * k.size(2);
}

// Each group costs its (b, c) chain one carry step, so groups are at least this many chunks long.
constexpr int kMinGroupChunks = 4;

// Enough (b, c, group) threads to keep every multiprocessor's thread slots full twice over, with
// groups of at least kMinGroupChunks chunks. Depends only on the shape and the device, so the
// backward cuts T as its forward did.
Plan plan_for(const at::Tensor& k) {
  const int B = static_cast<int>(k.size(0)), T = static_cast<int>(k.size(1)), C = static_cast<int>(k.size(2));
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, k.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, k.device().index()));
  const int64_t wanted = 2LL * sms * threads_per_sm;
  const int n_chunks = n_chunks_for(T);
  int64_t n_groups = (wanted + static_cast<int64_t>(B) * C - 1) / (static_cast<int64_t>(B) * C);
  n_groups = std::min<int64_t>({n_groups, std::max(1, n_chunks / kMinGroupChunks), 65535});
  const int group = static_cast<int>((n_chunks + n_groups - 1) / n_groups);
  return {B, T, C, n_chunks, group, static_cast<int>((n_chunks + group - 1) / group), false};
}

// Whether every [B, T, C] stream can be moved 16 bytes at a time.
bool vectorizable(int64_t C, std::initializer_list<const at::Tensor*> streams) {
  if (C % 8 != 0) return false;
  for (const at::Tensor* x : streams) {
    if (reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 != 0) return false;
  }
  return true;
}

// Blocks: (channel tile, group, batch row).
dim3 grid_for(const Plan& p, int groups) {
  return dim3(static_cast<unsigned>((p.C + kThreads - 1) / kThreads), static_cast<unsigned>(groups),
              static_cast<unsigned>(p.B));
}

void forward(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& aa0, const at::Tensor& bb0, const at::Tensor& pp0, at::Tensor& y, at::Tensor& aa,
             at::Tensor& bb, at::Tensor& pp, at::Tensor& arg, at::Tensor& checkpoints) {
  const int64_t BC = check_sizes(k);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const at::Device device = k.device();
  const auto f32 = at::kFloat, bf = at::kBFloat16;
  check_tensor(w, "w", f32, {C}, device);
  check_tensor(u, "u", f32, {C}, device);
  check_tensor(k, "k", bf, {B, T, C}, device);
  check_tensor(v, "v", bf, {B, T, C}, device);
  for (const auto& [x, name] : {std::pair{&aa0, "aa0"}, {&bb0, "bb0"}, {&pp0, "pp0"}, {&aa, "aa"}, {&bb, "bb"},
                                {&pp, "pp"}}) {
    check_tensor(*x, name, f32, {B, C}, device);
  }
  check_tensor(arg, "arg", at::kInt, {B, C}, device);
  check_tensor(y, "y", bf, {B, T, C}, device);
  check_tensor(checkpoints, "checkpoints", f32, {B, n_chunks_for(T), 3, C}, device);
  if (BC == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  Plan p = plan_for(k);
  p.vec = vectorizable(C, {&k, &v, &y});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto k_ = reinterpret_cast<const bf16*>(k.data_ptr<at::BFloat16>());
  const auto v_ = reinterpret_cast<const bf16*>(v.data_ptr<at::BFloat16>());
  at::Tensor sums, sum_arg;
  if (p.n_groups > 1) {
    sums = at::empty({B, p.n_groups, 3, C}, k.options().dtype(f32));
    sum_arg = at::empty({B, p.n_groups, C}, k.options().dtype(at::kInt));
    summarize_kernel<<<grid_for(p, p.n_groups - 1), kThreads, 0, stream>>>(
        p, w.data_ptr<float>(), k_, v_, sums.data_ptr<float>(), sum_arg.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  carry_kernel<<<grid_for(p, 1), kThreads, 0, stream>>>(
      p, w.data_ptr<float>(), aa0.data_ptr<float>(), bb0.data_ptr<float>(), pp0.data_ptr<float>(),
      p.n_groups > 1 ? sums.data_ptr<float>() : nullptr, p.n_groups > 1 ? sum_arg.data_ptr<int>() : nullptr,
      checkpoints.data_ptr<float>(), arg.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  outputs_kernel<<<grid_for(p, p.n_groups), kThreads, 0, stream>>>(
      p, w.data_ptr<float>(), u.data_ptr<float>(), k_, v_, checkpoints.data_ptr<float>(), arg.data_ptr<int>(),
      reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()), aa.data_ptr<float>(), bb.data_ptr<float>(),
      pp.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& checkpoints, const at::Tensor& arg, const at::Tensor& g_p, const at::Tensor& gy,
              const at::Tensor& g_aa, const at::Tensor& g_bb, at::Tensor& gw, at::Tensor& gu, at::Tensor& gk,
              at::Tensor& gv, at::Tensor& g_aa0, at::Tensor& g_bb0) {
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
  check_tensor(arg, "arg", at::kInt, {B, C}, device);
  for (const auto& [x, name] : {std::pair{&g_p, "g_p"}, {&g_aa, "g_aa"}, {&g_bb, "g_bb"}, {&gw, "gw"}, {&gu, "gu"},
                                {&g_aa0, "g_aa0"}, {&g_bb0, "g_bb0"}}) {
    check_tensor(*x, name, f32, {B, C}, device);
  }
  if (BC == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  Plan p = plan_for(k);
  p.vec = vectorizable(C, {&k, &v, &gy, &gk, &gv});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto k_ = reinterpret_cast<const bf16*>(k.data_ptr<at::BFloat16>());
  const auto v_ = reinterpret_cast<const bf16*>(v.data_ptr<at::BFloat16>());
  const auto gy_ = reinterpret_cast<const bf16*>(gy.data_ptr<at::BFloat16>());
  const auto opts = k.options().dtype(f32);
  at::Tensor gsums = at::empty({B, p.n_groups, 3, C}, opts), gend = at::empty({B, p.n_groups, 2, C}, opts);
  at::Tensor partial = at::empty({B, p.n_groups, 2, C}, opts);
  if (p.n_groups > 1) {
    grad_summarize_kernel<<<grid_for(p, p.n_groups - 1), kThreads, 0, stream>>>(
        p, w.data_ptr<float>(), u.data_ptr<float>(), k_, v_, gy_, checkpoints.data_ptr<float>(),
        gsums.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  grad_carry_kernel<<<grid_for(p, 1), kThreads, 0, stream>>>(p, g_aa.data_ptr<float>(), g_bb.data_ptr<float>(),
                                                              gsums.data_ptr<float>(), gend.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gradients_kernel<<<grid_for(p, p.n_groups), kThreads, 0, stream>>>(
      p, w.data_ptr<float>(), u.data_ptr<float>(), k_, v_, checkpoints.data_ptr<float>(), gend.data_ptr<float>(),
      arg.data_ptr<int>(), g_p.data_ptr<float>(), gy_, partial.data_ptr<float>(),
      reinterpret_cast<bf16*>(gk.data_ptr<at::BFloat16>()), reinterpret_cast<bf16*>(gv.data_ptr<at::BFloat16>()),
      g_aa0.data_ptr<float>(), g_bb0.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_kernel<<<grid_for(p, 1), kThreads, 0, stream>>>(p, partial.data_ptr<float>(), gw.data_ptr<float>(),
                                                          gu.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // WKV_KERNELS_ONLY
}  // namespace wkv4

#ifndef WKV_KERNELS_ONLY
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-4 WKV kernel: bf16 k, v, y; float32 state and arithmetic (see cuda/wkv4.cu)";
  m.def("forward", &wkv4::forward,
        "y, the final (aa, bb, pp), the token that set pp, and the chunk checkpoints, written into the given outputs");
  m.def("backward", &wkv4::backward, "gradients of w, u (per batch row), k, v and the initial (aa, bb)");
}
#endif  // WKV_KERNELS_ONLY
