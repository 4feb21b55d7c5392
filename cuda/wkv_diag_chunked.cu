// RWKV-5 / RWKV-6 WKV (a diagonal decay), chunked: 16 steps at a time, every product on tensor cores
// (bf16 operands, float32 accumulation), the state in float32. Same contract as wkv_diag.cu (the
// sequential kernel) plus one saved tensor: the state at the start of every chunk, in bf16, which the
// backward reads instead of recomputing the forward. The state is [key j][value i], as there:
//
//     y_t = r_t (S_{t-1} + diag(u) k_t^T v_t)        S_t = diag(w_t) S_{t-1} + k_t^T v_t
//
// One block per (batch, head) walks the chunks. Per chunk of L steps from state S, with c_t the
// cumulative log-decay through step t, c_ex[t] = c_{t-1} (0 at the first step), the chunk's total c_L
// and its log-space middle c_ref = c_L / 2 (all per key channel):
//
//     left  = r e^(c_ex - c_ref)     right = k e^(c_ref - c_t)      (M = left right^T below the diagonal:
//     hat   = r e^(c_ex)             ends  = k e^(c_L - c_t)         M[t,s] = sum_j r_tj k_sj e^(c_ex[t] - c_s))
//     d_t   = sum_j r_tj u_j k_tj    (the current token's bonus, in float32 beside the products)
//     Y     = M V + hat S + diag(d) V            S'    = diag(e^(c_L)) S + ends^T V
//
// Nothing in a chunk is a recurrence: M, Y and S' are tile products. The split around c_ref keeps
// every factor within e^(|c_L| / 2); a per-step log-decay below LW_MIN is taken as LW_MIN (a decay of
// e^-8 = 3.4e-4 per step instead of a smaller one, below bf16's resolution beside the newer terms),
// with zero gradient there. Each factor is its own exponential, so none is a product that could
// flush to zero while the factor it stands for is normal.
//
// Backward per chunk, last chunk first, with dS the gradient of the chunk's end state and dY = dy:
//     dM     = dY V^T   (below the diagonal: d left = dM right, d right = dM^T left; on it: the bonus)
//     d hat  = dY S^T   d ends = V dS^T    dV = M^T dY + ends dS + diag(d) dY    Z_j = sum_i S[j,i] dS[j,i]
//     dS    <- diag(e^(c_L)) dS + hat^T dY
// and the chain through the exponents, each factor x e^(phi) adding g_x x to phi's gradient:
//     dc_ex[t] = g_left left + g_hat hat,   dc_t = -(g_right right + g_ends ends),
//     dc_L = sum_t g_ends ends + Z e^(c_L),  dlw_s = sum_{t>=s} dc_t + sum_{t>s} dc_ex[t] + dc_L;
// c_ref gets no gradient (sum(g_left left) = sum(dM * M) = sum(g_right right): the split point is free).
// The bonus diagonal d_t = dM[t,t] adds d_t u k to dr, d_t u r to dk, and sum_t d_t r k to du.
#ifndef WKV_KERNELS_ONLY  // defined by `make cuda-check`: compile the kernels alone, fast
#include "wkv_binding.cuh"
#endif
#include "wkv_chunk_tiles.cuh"

namespace wkvdc {

using namespace wkvc;

constexpr float LW_MIN = -8.f;  // per-step log-decay floor: factors within e^(8 * 8) = 6e27
constexpr int LDM = L + 8;      // leading dimension of the [L][L] tiles
constexpr int PARTS = 4;        // threads summing one step's bonus, N / PARTS channels each
static_assert(N % 16 == 0 && N >= 32 && N <= 64, "the chunked diagonal kernel is built for head sizes 32 and 64");
static_assert(L * PARTS <= THREADS / 2 && N <= THREADS / 2, "bonus sums and Z each fit in half the block");

constexpr size_t STATE_F = size_t(N) * LDH * 4, STATE_H = size_t(N) * LDH * 2;
constexpr size_t TILE_H = size_t(L) * LDH * 2, TILE_F = size_t(L) * LDH * 4;
constexpr size_t SQUARE_F = size_t(L) * LDM * 4, SQUARE_H = size_t(L) * LDM * 2;

// The forward keeps under 56 KB at N = 64: 4 blocks per H100 multiprocessor.
struct ForwardSmem {
    size_t S, Sh, left, right, hat, ends, V, bonus, M, Mh, Y, parts, diag, decay, bytes;
    __host__ __device__ constexpr ForwardSmem()
        : S(), Sh(), left(), right(), hat(), ends(), V(), bonus(), M(), Mh(), Y(), parts(), diag(), decay(), bytes() {
        Carve c;
        S = c.take(STATE_F), Sh = c.take(STATE_H);
        left = c.take(TILE_H), right = c.take(TILE_H), hat = c.take(TILE_H), ends = c.take(TILE_H), V = c.take(TILE_H);
        bonus = c.take(TILE_F), M = c.take(SQUARE_F), Mh = c.take(SQUARE_H), Y = c.take(TILE_F);
        parts = c.take(L * PARTS * 4), diag = c.take(L * 4), decay = c.take(N * 4);
        bytes = c.end;
    }
};
static_assert(N != 64 || ForwardSmem().bytes + 1024 <= 228 * 1024 / 4, "4 forward blocks per multiprocessor");

struct BackwardSmem {
    size_t Sh, dS, dSh, left, right, hat, ends, V, dY, bonus, M, Mh, dM, dMh, d_left, d_right, d_hat, d_ends, dV, cum,
        Z, decay, parts, diag, clamped, bytes;
    __host__ __device__ constexpr BackwardSmem()
        : Sh(), dS(), dSh(), left(), right(), hat(), ends(), V(), dY(), bonus(), M(), Mh(), dM(), dMh(), d_left(),
          d_right(), d_hat(), d_ends(), dV(), cum(), Z(), decay(), parts(), diag(), clamped(), bytes() {
        Carve c;
        Sh = c.take(STATE_H), dS = c.take(STATE_F), dSh = c.take(STATE_H);
        left = c.take(TILE_H), right = c.take(TILE_H), hat = c.take(TILE_H), ends = c.take(TILE_H), V = c.take(TILE_H);
        dY = c.take(TILE_H), bonus = c.take(TILE_F);
        M = c.take(SQUARE_F), Mh = c.take(SQUARE_H), dM = c.take(SQUARE_F), dMh = c.take(SQUARE_H);
        d_left = c.take(TILE_F), d_right = c.take(TILE_F), d_hat = c.take(TILE_F), d_ends = c.take(TILE_F);
        dV = c.take(TILE_F), cum = c.take(size_t(L) * N * 4), Z = c.take(N * 4), decay = c.take(N * 4);
        parts = c.take(L * PARTS * 4), diag = c.take(L * 4), clamped = c.take(N * 4);
        bytes = c.end;
    }
};

struct Inputs {
    const bf16 *r, *k, *v;
    const float *lw, *u;
    bool lw_per_step;  // lw is [B, T, H, N] (RWKV-6), else one [H, N] for every step (RWKV-5)
};

// A chunk's inputs as one thread uses them: every step's log-decay of its channel n = tid % N, and r,
// k, v of the PER consecutive steps t = tid / N * PER + j of that channel (v of value channel n),
// all loaded before any is used (one memory latency per chunk, not one per step).
struct ChunkLoads {
    float lw[L];                  // 0 past the end
    bf16 r[PER], k[PER], v[PER];  // 0 past the end
};

__device__ __forceinline__ void load_chunk(const Inputs& in, const HeadRows& rows, int h, int t0, int steps,
                                           ChunkLoads& x) {
    const int n = threadIdx.x % N, first = threadIdx.x / N * PER;
    if (in.lw_per_step) {
        const float* lw = in.lw + rows.at(t0, n);
#pragma unroll
        for (int t = 0; t < L; t++, lw += rows.stride) x.lw[t] = t < steps ? *lw : 0.f;
    } else {
        const float lw = in.lw[h * N + n];
#pragma unroll
        for (int t = 0; t < L; t++) x.lw[t] = t < steps ? lw : 0.f;
    }
    const int64_t at = rows.at(t0 + first, n);
    const bf16 *r = in.r + at, *k = in.k + at, *v = in.v + at, zero = to_bf16(0.f);
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const bool live = first + j < steps;
        const int64_t o = j * rows.stride;
        x.r[j] = live ? r[o] : zero, x.k[j] = live ? k[o] : zero, x.v[j] = live ? v[o] : zero;
    }
}

// The cumulative log-decays of the thread's channel through every step of the chunk: c[t + 1] through
// step t, c[0] = 0, each step's log-decay floored at LW_MIN. Returns the floored steps (bit t).
__device__ __forceinline__ unsigned cumulative(const float lw[L], float c[L + 1]) {
    unsigned clamped = 0;
    c[0] = 0.f;
#pragma unroll
    for (int t = 0; t < L; t++) clamped |= unsigned(lw[t] < LW_MIN) << t, c[t + 1] = c[t] + fmaxf(lw[t], LW_MIN);
    return clamped;
}

// c through step t = group * PER + j (in) and through t - 1 (ex), picked by a select per group:
// indexing c with the run-time t would move it to local memory.
__device__ __forceinline__ void pick(const float c[L + 1], int group, int j, float& c_in, float& c_ex) {
    c_in = c[j + 1], c_ex = c[j];
#pragma unroll
    for (int other = 1; other < GROUPS; other++)
        if (group == other) c_in = c[other * PER + j + 1], c_ex = c[other * PER + j];
}

// One chunk's factor tiles (left, right, hat, ends, V; the bonus terms r u k in float32), decay[n] =
// e^(c_L), and where cum is given c_t into cum [L][N]. Each thread its own (step, channel) pairs;
// no synchronisation inside. Returns the thread's channel's floored steps.
__device__ __forceinline__ unsigned chunk_factors(const ChunkLoads& x, float u, bf16* left, bf16* right, bf16* hat,
                                                  bf16* ends, bf16* V, float* bonus, float* decay, float* cum) {
    const int n = threadIdx.x % N, group = threadIdx.x / N;
    float c[L + 1];
    const unsigned clamped = cumulative(x.lw, c);
    const float c_L = c[L], c_ref = 0.5f * c_L;
    if (group == 0) decay[n] = __expf(c_L);
#pragma unroll
    for (int j = 0; j < PER; j++) {
        float c_in, c_ex;
        pick(c, group, j, c_in, c_ex);
        const int t = group * PER + j, at = t * LDH + n;
        const float r = f32(x.r[j]), k = f32(x.k[j]);
        left[at] = to_bf16(r * __expf(c_ex - c_ref)), hat[at] = to_bf16(r * __expf(c_ex));
        right[at] = to_bf16(k * __expf(c_ref - c_in)), ends[at] = to_bf16(k * __expf(c_L - c_in));
        V[at] = x.v[j];
        bonus[at] = r * u * k;
        if (cum) cum[t * N + n] = c_in;
    }
    return clamped;
}

// parts[t][p] = sum of bonus[t][n] over the p-th of PARTS runs of channels; by the L * PARTS threads
// from `first` (the others pass).
__device__ __forceinline__ void bonus_parts(const float* bonus, float* parts, int first) {
    const int job = threadIdx.x - first;
    if (job < 0 || job >= L * PARTS) return;
    const int t = job / PARTS, p = job % PARTS;
    const float* row = bonus + t * LDH + p * (N / PARTS);
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < N / PARTS; q += 4) {
        const float4 b = load4(row + q);
        sum += (b.x + b.y) + (b.z + b.w);
    }
    parts[job] = sum;
}

// Mh = M in bf16 below the diagonal, zero on and above it; the diagonal, the bonus r_t . (u * k_t),
// into diag[t] in float32: y adds diag[t] v_t itself (and dv diag[t] dy_t), so the current token's
// term, often the largest, does not go through a bf16 operand.
__device__ __forceinline__ void mask_m(const float* M, const float* parts, bf16* Mh, float* diag) {
#pragma unroll
    for (int q = 0; q < L * L / THREADS; q++) {
        const int e = threadIdx.x + q * THREADS, t = e / L, s = e % L;
        if (s == t) {
            float sum = 0.f;
#pragma unroll
            for (int p = 0; p < PARTS; p++) sum += parts[t * PARTS + p];
            diag[t] = sum;
        }
        Mh[t * LDM + s] = to_bf16(s < t ? M[t * LDM + s] : 0.f);
    }
}
static_assert(L * L % THREADS == 0 && L * LDH >= THREADS, "whole entries of M per thread; du sums fit the bonus tile");

// The block's float32 state rows scaled by the decay of their key channel: f[j, :] *= decay[j].
__device__ __forceinline__ void scale_rows(float* f, const float* decay) {
#pragma unroll
    for (int i = 0; i < QUADS<N>; i++) {
        const int at = quad_at(i);
        const float d = decay[at / LDH];
        float4 x = load4(f + at);
        x.x *= d, x.y *= d, x.z *= d, x.w *= d;
        store4(f + at, x);
    }
}

__global__ void __launch_bounds__(THREADS, 4) forward_kernel(int T, int H, Inputs in, const float* __restrict__ s0,
                                                          bf16* __restrict__ y, float* __restrict__ s_final,
                                                          bf16* __restrict__ states) {
    WKV_DYNAMIC_SMEM(smem);
    constexpr ForwardSmem F;
    float* S = reinterpret_cast<float*>(smem + F.S);
    bf16* Sh = reinterpret_cast<bf16*>(smem + F.Sh);
    bf16 *left = reinterpret_cast<bf16*>(smem + F.left), *right = reinterpret_cast<bf16*>(smem + F.right);
    bf16 *hat = reinterpret_cast<bf16*>(smem + F.hat), *ends = reinterpret_cast<bf16*>(smem + F.ends);
    bf16* V = reinterpret_cast<bf16*>(smem + F.V);
    float *bonus = reinterpret_cast<float*>(smem + F.bonus), *M = reinterpret_cast<float*>(smem + F.M);
    bf16* Mh = reinterpret_cast<bf16*>(smem + F.Mh);
    float *Y = reinterpret_cast<float*>(smem + F.Y), *parts = reinterpret_cast<float*>(smem + F.parts);
    float *diag = reinterpret_cast<float*>(smem + F.diag), *decay = reinterpret_cast<float*>(smem + F.decay);

    const int b = blockIdx.y, h = blockIdx.x, tid = threadIdx.x;
    const HeadRows g(T, H, b, h);
    const int64_t head = int64_t(b) * H + h;
    const int chunks = (T + L - 1) / L;
    const float u = in.u[h * N + tid % N];
    load_state<N>(s0 + head * N * N, S, Sh);
    __syncthreads();
    for (int c = 0; c < chunks; c++) {
        const int t0 = c * L, steps = min(L, T - t0);
        ChunkLoads x;
        load_chunk(in, g, h, t0, steps, x);
        save_state<N>(Sh, states + (head * chunks + c) * N * N);
        chunk_factors(x, u, left, right, hat, ends, V, bonus, decay, nullptr);
        __syncthreads();
        if (tid < 32) tile_mma<row, col>(M, LDM, left, LDH, right, LDH, N, false);  // left right^T
        bonus_parts(bonus, parts, THREADS / 2);
        __syncthreads();
        mask_m(M, parts, Mh, diag);
        __syncthreads();
        matmul<row, row>(Y, LDH, Mh, LDM, V, LDH, L, N, L, false);  // M V
        matmul<row, row>(Y, LDH, hat, LDH, Sh, LDH, L, N, N, true);  // + hat S (each warp its own tiles)
        scale_rows(S, decay);
        __syncthreads();
        matmul<col, row>(S, LDH, ends, LDH, V, LDH, N, N, L, true);  // S += ends^T V
#pragma unroll
        for (int q = 0; q < L * N / THREADS; q++) {
            const int e = tid + q * THREADS, t = e / N, i = e % N;
            if (t < steps) y[g.at(t0 + t, i)] = to_bf16(Y[t * LDH + i] + diag[t] * f32(V[t * LDH + i]));
        }
        __syncthreads();
        round_state<N>(S, Sh);
        __syncthreads();
    }
    store_state<N>(S, s_final + head * N * N);
}

struct Grads {
    bf16 *dr, *dk, *dv;
    float *dlw, *du;  // dlw per step [B, T, H, N]; du per (batch, head) [B, H, N]
};

// Everything the backward reads from global memory for chunk c: its start state, its inputs and dy.
struct BackwardLoads {
    SavedState<N> start;
    ChunkLoads x;
    bf16 dy[PER];
};
__device__ __forceinline__ void load_backward(const Inputs& in, const bf16* dy, const bf16* states,
                                              const HeadRows& rows, int h, int64_t head, int chunks, int c, int T,
                                              BackwardLoads& l) {
    const int t0 = c * L, steps = min(L, T - t0), n = threadIdx.x % N, first = threadIdx.x / N * PER;
    load_saved<N>(states + (head * chunks + c) * N * N, l.start);
    load_chunk(in, rows, h, t0, steps, l.x);
    const bf16 *d = dy + rows.at(t0 + first, n), zero = to_bf16(0.f);
#pragma unroll
    for (int j = 0; j < PER; j++) l.dy[j] = first + j < steps ? d[j * rows.stride] : zero;
}

__global__ void __launch_bounds__(THREADS, 2) backward_kernel(int T, int H, Inputs in, const bf16* __restrict__ dy,
                                                           const bf16* __restrict__ states,
                                                           const float* __restrict__ ds_final, Grads out,
                                                           float* __restrict__ ds0) {
    WKV_DYNAMIC_SMEM(smem);
    constexpr BackwardSmem B_;
    bf16* Sh = reinterpret_cast<bf16*>(smem + B_.Sh);
    float* dS = reinterpret_cast<float*>(smem + B_.dS);
    bf16* dSh = reinterpret_cast<bf16*>(smem + B_.dSh);
    bf16 *left = reinterpret_cast<bf16*>(smem + B_.left), *right = reinterpret_cast<bf16*>(smem + B_.right);
    bf16 *hat = reinterpret_cast<bf16*>(smem + B_.hat), *ends = reinterpret_cast<bf16*>(smem + B_.ends);
    bf16 *V = reinterpret_cast<bf16*>(smem + B_.V), *dYh = reinterpret_cast<bf16*>(smem + B_.dY);
    float *bonus = reinterpret_cast<float*>(smem + B_.bonus), *M = reinterpret_cast<float*>(smem + B_.M);
    bf16* Mh = reinterpret_cast<bf16*>(smem + B_.Mh);
    float* dM = reinterpret_cast<float*>(smem + B_.dM);
    bf16* dMh = reinterpret_cast<bf16*>(smem + B_.dMh);
    float *d_left = reinterpret_cast<float*>(smem + B_.d_left), *d_right = reinterpret_cast<float*>(smem + B_.d_right);
    float *d_hat = reinterpret_cast<float*>(smem + B_.d_hat), *d_ends = reinterpret_cast<float*>(smem + B_.d_ends);
    float *dV = reinterpret_cast<float*>(smem + B_.dV), *cum = reinterpret_cast<float*>(smem + B_.cum);
    float *Z = reinterpret_cast<float*>(smem + B_.Z), *decay = reinterpret_cast<float*>(smem + B_.decay);
    float *parts = reinterpret_cast<float*>(smem + B_.parts), *diag = reinterpret_cast<float*>(smem + B_.diag);
    unsigned* clamped = reinterpret_cast<unsigned*>(smem + B_.clamped);

    const int b = blockIdx.y, h = blockIdx.x, tid = threadIdx.x, warp = tid / 32;
    const int n = tid % N, group = tid / N, first = group * PER;  // the thread's channel and steps
    const HeadRows g(T, H, b, h);
    const int64_t head = int64_t(b) * H + h;
    const int chunks = (T + L - 1) / L;
    const float u = in.u[h * N + n];
    float du = 0.f;  // sum over the thread's steps of d_t r k
    load_state<N>(ds_final + head * N * N, dS, dSh);
    BackwardLoads next;  // the chunk's global reads, issued while the chunk after it is worked on
    load_backward(in, dy, states, g, h, head, chunks, chunks - 1, T, next);
    for (int c = chunks - 1; c >= 0; c--) {
        const int t0 = c * L, steps = min(L, T - t0);
        const BackwardLoads now = next;
        store_saved<N>(now.start, Sh);
        const unsigned clamped_steps = chunk_factors(now.x, u, left, right, hat, ends, V, bonus, decay, cum);
        if (tid < N) clamped[tid] = clamped_steps;
#pragma unroll
        for (int j = 0; j < PER; j++) dYh[(first + j) * LDH + n] = now.dy[j];
        if (c > 0) load_backward(in, dy, states, g, h, head, chunks, c - 1, T, next);
        __syncthreads();
        if (warp == 0) tile_mma<row, col>(M, LDM, left, LDH, right, LDH, N, false);  // left right^T
        if (warp == 1) tile_mma<row, col>(dM, LDM, dYh, LDH, V, LDH, N, false);      // dY V^T
        bonus_parts(bonus, parts, THREADS / 2);
        matmul<row, col>(d_hat, LDH, dYh, LDH, Sh, LDH, L, N, N, false);  // dY S^T
        matmul<row, col>(d_ends, LDH, V, LDH, dSh, LDH, L, N, N, false);  // V dS^T
        if (tid < N) {  // Z_j = sum_i S[j,i] dS[j,i], before dS moves on
            float z = 0.f;
            for (int i = 0; i < N; i++) z += f32(Sh[tid * LDH + i]) * dS[tid * LDH + i];
            Z[tid] = z;
        }
        __syncthreads();
        mask_m(M, parts, Mh, diag);
#pragma unroll
        for (int q = 0; q < L * L / THREADS; q++) {  // dM below the diagonal (its diagonal is the bonus')
            const int e = tid + q * THREADS, t = e / L, s = e % L;
            dMh[t * LDM + s] = to_bf16(s < t ? dM[t * LDM + s] : 0.f);
        }
        scale_rows(dS, decay);
        __syncthreads();
        matmul<col, row>(dV, LDH, Mh, LDM, dYh, LDH, L, N, L, false);     // M^T dY
        matmul<row, row>(dV, LDH, ends, LDH, dSh, LDH, L, N, N, true);    // + ends dS
        matmul<row, row>(d_left, LDH, dMh, LDM, right, LDH, L, N, L, false);  // dM right
        matmul<col, row>(d_right, LDH, dMh, LDM, left, LDH, L, N, L, false);  // dM^T left
        matmul<col, row>(dS, LDH, hat, LDH, dYh, LDH, N, N, L, true);         // dS += hat^T dY
        __syncthreads();
        // The input gradients of channel n at the thread's steps, the last first; dlw_s = sum_{t>=s} dc_t
        // + sum_{t>s} dc_ex[t] + dc_L, summed over the thread's own steps as it goes. What the channel's
        // other threads need of it (the sum of dc_t + dc_ex over its steps, its terms of dc_L) it leaves
        // in two of its own (step, channel) places of d_right, which nobody else reads here.
        {
            const float c_L = cum[(L - 1) * N + n], c_ref = 0.5f * c_L;
            float suffix[PER], run = 0.f, dc_L = 0.f;
#pragma unroll
            for (int j = PER - 1; j >= 0; j--) {
                const int t = first + j, at = t * LDH + n;
                const float c_in = cum[t * N + n], c_ex = t > 0 ? cum[(t - 1) * N + n] : 0.f;
                const float gl = d_left[at], gh = d_hat[at], gr = d_right[at], ge = d_ends[at];
                const float bonus_d = dM[t * LDM + t], r = f32(now.x.r[j]), k = f32(now.x.k[j]);
                if (t < steps) {
                    const int64_t o = g.at(t0 + t, n);
                    out.dr[o] = to_bf16(gl * __expf(c_ex - c_ref) + gh * __expf(c_ex) + bonus_d * u * k);
                    out.dk[o] = to_bf16(gr * __expf(c_ref - c_in) + ge * __expf(c_L - c_in) + bonus_d * u * r);
                    out.dv[o] = to_bf16(dV[at] + diag[t] * f32(dYh[at]));
                }
                du += bonus_d * r * k;
                const float t_end = ge * f32(ends[at]);
                run -= gr * f32(right[at]) + t_end;  // dc_t
                suffix[j] = run;
                run += gl * f32(left[at]) + gh * f32(hat[at]);  // dc_ex[t]
                dc_L += t_end;
            }
            d_right[first * LDH + n] = run, d_right[(first + 1) * LDH + n] = dc_L;
            round_state<N>(dS, dSh);
            __syncthreads();
            write_dlw<GROUPS, PER>(d_right, Z, decay, n, group, suffix, clamped[n], steps, out.dlw, g, t0);
        }
        __syncthreads();
    }
    store_state<N>(dS, ds0 + head * N * N);
    bonus[tid] = du;  // the channel's GROUPS partial sums (the bonus tile is free after the last chunk)
    __syncthreads();
    if (tid < N) {
        float sum = 0.f;
#pragma unroll
        for (int other = 0; other < GROUPS; other++) sum += bonus[other * N + tid];
        out.du[head * N + tid] = sum;
    }
}

// Launches, shared by the torch binding below and the CPU emulation in tests/cuda_cpu.
inline void launch_forward(cudaStream_t stream, int B, int T, int H, Inputs in, const float* s0, bf16* y,
                           float* s_final, bf16* states) {
    constexpr ForwardSmem F;
    WKV_ALLOW_SMEM(forward_kernel, F.bytes);
    WKV_LAUNCH(forward_kernel, dim3(H, B), THREADS, F.bytes, stream, T, H, in, s0, y, s_final, states);
}

inline void launch_backward(cudaStream_t stream, int B, int T, int H, Inputs in, const bf16* dy, const bf16* states,
                            const float* ds_final, Grads out, float* ds0) {
    constexpr BackwardSmem S;
    WKV_ALLOW_SMEM(backward_kernel, S.bytes);
    WKV_LAUNCH(backward_kernel, dim3(H, B), THREADS, S.bytes, stream, T, H, in, dy, states, ds_final, out, ds0);
}

}  // namespace wkvdc

#ifndef WKV_KERNELS_ONLY
// ---------------------------------------------------------------------------------------------
// Host side. Python allocates every output (so tests can poison them) and checks shapes; here we
// check what would make the kernels read or write out of bounds.
namespace {

using torch::Tensor;
using wkv_binding::bf16_in, wkv_binding::bf16_out;
constexpr const char* OP = "wkv_diag_chunked";

// lw is [B, T, H, N] (RWKV-6) or [H, N] (RWKV-5); u is [H, N].
wkvdc::Inputs inputs(const Tensor& r, const Tensor& lw, const Tensor& k, const Tensor& v, const Tensor& u,
                     const Tensor& states) {
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkvdc::N, "wkv_diag_chunked: inputs must be [B, T, H, ", wkvdc::N, "]");
    const int64_t n = r.numel(), heads = r.size(2) * wkvdc::N, chunks = (r.size(1) + wkvdc::L - 1) / wkvdc::L;
    for (auto [x, name] : {std::pair{r, "r"}, {k, "k"}, {v, "v"}}) wkv_binding::check(OP, x, name, at::kBFloat16, n);
    const bool per_step = lw.dim() == 4;
    wkv_binding::check(OP, lw, "lw", at::kFloat, per_step ? n : heads);
    wkv_binding::check(OP, u, "u", at::kFloat, heads);
    const int64_t saved = r.size(0) * r.size(2) * chunks * wkvdc::N * wkvdc::N;
    wkv_binding::check_aligned(OP, states, "states", at::kBFloat16, saved);
    return wkvdc::Inputs{bf16_in(r), bf16_in(k), bf16_in(v), lw.data_ptr<float>(), u.data_ptr<float>(), per_step};
}

void forward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor u, Tensor s0, Tensor y, Tensor s_final, Tensor states) {
    const wkvdc::Inputs in = inputs(r, lw, k, v, u, states);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t ns = int64_t(B) * H * wkvdc::N * wkvdc::N;
    wkv_binding::check(OP, y, "y", at::kBFloat16, r.numel());
    wkv_binding::check_aligned(OP, s0, "s0", at::kFloat, ns);
    wkv_binding::check_aligned(OP, s_final, "s_final", at::kFloat, ns);
    if (B == 0 || H == 0) return;
    wkvdc::launch_forward(c10::cuda::getCurrentCUDAStream(), B, T, H, in, s0.data_ptr<float>(), bf16_out(y),
                          s_final.data_ptr<float>(), bf16_out(states));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor u, Tensor states, Tensor dy, Tensor ds_final, Tensor dr,
              Tensor dlw, Tensor dk, Tensor dv, Tensor du, Tensor ds0) {
    const wkvdc::Inputs in = inputs(r, lw, k, v, u, states);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t n = r.numel(), ns = int64_t(B) * H * wkvdc::N * wkvdc::N;
    for (auto [x, name] : {std::pair{dy, "dy"}, {dr, "dr"}, {dk, "dk"}, {dv, "dv"}})
        wkv_binding::check(OP, x, name, at::kBFloat16, n);
    wkv_binding::check(OP, dlw, "dlw (per step)", at::kFloat, n);
    wkv_binding::check(OP, du, "du (per batch and head)", at::kFloat, int64_t(B) * H * wkvdc::N);
    wkv_binding::check_aligned(OP, ds_final, "ds_final", at::kFloat, ns);
    wkv_binding::check_aligned(OP, ds0, "ds0", at::kFloat, ns);
    if (B == 0 || H == 0) return;
    const wkvdc::Grads out{bf16_out(dr), bf16_out(dk), bf16_out(dv), dlw.data_ptr<float>(), du.data_ptr<float>()};
    wkvdc::launch_backward(c10::cuda::getCurrentCUDAStream(), B, T, H, in, bf16_in(dy), bf16_in(states),
                           ds_final.data_ptr<float>(), out, ds0.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.attr("head_size") = wkvdc::N;
    m.attr("chunk_len") = wkvdc::L;
    m.attr("log_decay_min") = wkvdc::LW_MIN;
    m.def("forward", &forward,
          "chunked WKV-5/6 forward: writes y, the final state and every chunk's start state (bf16)");
    m.def("backward", &backward,
          "chunked WKV-5/6 backward: writes dr, dlw (per step), dk, dv, du (per batch and head), ds0");
}
#endif  // WKV_KERNELS_ONLY
