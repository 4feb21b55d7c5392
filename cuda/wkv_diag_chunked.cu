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

// Tiles and the state's block of value columns: [rows][VALUES] with leading dimension ldv<VALUES>.
template <int VALUES>
constexpr int ldv = VALUES + 8;  // a multiple of 8 (16 bytes of bf16, 32 of float)
constexpr size_t TILE_H = size_t(L) * LDH * 2, TILE_F = size_t(L) * LDH * 4;
constexpr size_t SQUARE_F = size_t(L) * LDM * 4, SQUARE_H = size_t(L) * LDM * 2;
template <int VALUES>
constexpr size_t state_bytes(int element) { return size_t(N) * ldv<VALUES> * element; }  // [N keys][VALUES]
template <int VALUES>
constexpr size_t value_tile_bytes(int element) { return size_t(L) * ldv<VALUES> * element; }  // [L][VALUES]

// The forward keeps under 56 KB at N = 64: 4 blocks per H100 multiprocessor.
template <int VALUES>
struct ForwardSmem {
    size_t S, Sh, left, right, hat, ends, V, bonus, M, Mh, Y, lw, parts, diag, decay, bytes;
    __host__ __device__ constexpr ForwardSmem()
        : S(), Sh(), left(), right(), hat(), ends(), V(), bonus(), M(), Mh(), Y(), lw(), parts(), diag(), decay(),
          bytes() {
        Carve c;
        S = c.take(state_bytes<VALUES>(4)), Sh = c.take(state_bytes<VALUES>(2));
        left = c.take(TILE_H), right = c.take(TILE_H), hat = c.take(TILE_H), ends = c.take(TILE_H);
        V = c.take(value_tile_bytes<VALUES>(2)), bonus = c.take(TILE_F), M = c.take(SQUARE_F), Mh = c.take(SQUARE_H);
        Y = c.take(value_tile_bytes<VALUES>(4)), lw = c.take(size_t(L) * N * 4), parts = c.take(L * PARTS * 4);
        diag = c.take(L * 4), decay = c.take(N * 4);
        bytes = c.end;
    }
};
static_assert(N != 64 || ForwardSmem<N>().bytes + 1024 <= 228 * 1024 / 4, "4 forward blocks per multiprocessor");
static_assert(size_t(L) * N * 4 <= TILE_F, "the backward stages a chunk's log-decays in d_left's place");

template <int VALUES>
struct BackwardSmem {
    size_t Sh, dS, dSh, left, right, hat, ends, rt, kt, V, dY, bonus, M, Mh, dM, dMh, d_left, d_right, d_hat, d_ends,
        dV, cum, Z, decay, parts, diag, dd, clamped, bytes;
    __host__ __device__ constexpr BackwardSmem()
        : Sh(), dS(), dSh(), left(), right(), hat(), ends(), rt(), kt(), V(), dY(), bonus(), M(), Mh(), dM(), dMh(),
          d_left(), d_right(), d_hat(), d_ends(), dV(), cum(), Z(), decay(), parts(), diag(), dd(), clamped(), bytes() {
        Carve c;
        Sh = c.take(state_bytes<VALUES>(2)), dS = c.take(state_bytes<VALUES>(4)), dSh = c.take(state_bytes<VALUES>(2));
        left = c.take(TILE_H), right = c.take(TILE_H), hat = c.take(TILE_H), ends = c.take(TILE_H);
        rt = c.take(TILE_H), kt = c.take(TILE_H);
        V = c.take(value_tile_bytes<VALUES>(2)), dY = c.take(value_tile_bytes<VALUES>(2)), bonus = c.take(TILE_F);
        M = c.take(SQUARE_F), Mh = c.take(SQUARE_H), dM = c.take(SQUARE_F), dMh = c.take(SQUARE_H);
        d_left = c.take(TILE_F), d_right = c.take(TILE_F), d_hat = c.take(TILE_F), d_ends = c.take(TILE_F);
        dV = c.take(value_tile_bytes<VALUES>(4)), cum = c.take(size_t(L) * N * 4), Z = c.take(N * 4);
        decay = c.take(N * 4), parts = c.take(L * PARTS * 4), diag = c.take(L * 4), dd = c.take(L * 4);
        clamped = c.take(N * 4);
        bytes = c.end;
    }
};

// A block's VALUES value columns of the float32 state (or its gradient), all N key rows, in shared
// memory [N][ldv] with a bf16 copy for the products; in global memory the columns v0 .. of a
// row-major [N][N] state. The helpers deal them out in 16-byte pieces of 4 columns: a thread's i-th
// piece is p = tid + i * THREADS, row p / (VALUES / 4), so a thread keeps the same columns.
template <int VALUES>
constexpr int PIECES = N * VALUES / (4 * THREADS);  // 4-float pieces per thread
template <int VALUES>
__device__ __forceinline__ int piece_row(int i) { return (int(threadIdx.x) + i * THREADS) / (VALUES / 4); }
template <int VALUES>
__device__ __forceinline__ int piece_col(int i) { return (int(threadIdx.x) + i * THREADS) % (VALUES / 4) * 4; }
template <int VALUES>
__device__ __forceinline__ void load_columns(const float* src, float* f, bf16* h) {  // src: (row 0, column v0)
    static_assert(N * VALUES % (4 * THREADS) == 0 && THREADS % (VALUES / 4) == 0, "whole pieces, fixed columns");
    float4 q[PIECES<VALUES>];
#pragma unroll
    for (int i = 0; i < PIECES<VALUES>; i++) q[i] = load4(src + piece_row<VALUES>(i) * N + piece_col<VALUES>(i));
#pragma unroll
    for (int i = 0; i < PIECES<VALUES>; i++) {
        const int at = piece_row<VALUES>(i) * ldv<VALUES> + piece_col<VALUES>(i);
        store4(f + at, q[i]), store_bf16x4(h + at, q[i]);
    }
}
template <int VALUES>
__device__ __forceinline__ void store_columns(const float* f, float* dst) {
#pragma unroll
    for (int i = 0; i < PIECES<VALUES>; i++)
        store4(dst + piece_row<VALUES>(i) * N + piece_col<VALUES>(i),
               load4(f + piece_row<VALUES>(i) * ldv<VALUES> + piece_col<VALUES>(i)));
}
template <int VALUES>
__device__ __forceinline__ void round_columns(const float* f, bf16* h) {
#pragma unroll
    for (int i = 0; i < PIECES<VALUES>; i++) {
        const int at = piece_row<VALUES>(i) * ldv<VALUES> + piece_col<VALUES>(i);
        store_bf16x4(h + at, load4(f + at));
    }
}
template <int VALUES>
__device__ __forceinline__ void scale_rows(float* f, const float* decay) {  // f[j, :] *= decay[j]
#pragma unroll
    for (int i = 0; i < PIECES<VALUES>; i++) {
        const int row = piece_row<VALUES>(i), at = row * ldv<VALUES> + piece_col<VALUES>(i);
        const float d = decay[row];
        float4 x = load4(f + at);
        x.x *= d, x.y *= d, x.z *= d, x.w *= d;
        store4(f + at, x);
    }
}
// The same columns of a saved chunk-start state ([N][N] bf16 in global memory), 16 bytes (8 columns) a
// piece; with fewer pieces than threads the rest sit out.
template <int VALUES>
constexpr int SAVED_PIECES = (N * VALUES / VEC + THREADS - 1) / THREADS;
template <int VALUES>
struct SavedColumns {
    uint4 piece[SAVED_PIECES<VALUES>];
};
template <int VALUES>
__device__ __forceinline__ bool saved_piece(int i, int& row, int& col) {
    const int p = int(threadIdx.x) + i * THREADS;
    row = p / (VALUES / VEC), col = p % (VALUES / VEC) * VEC;
    return p < N * VALUES / VEC;
}
template <int VALUES>
__device__ __forceinline__ void save_columns(const bf16* Sh, bf16* dst) {
#pragma unroll
    for (int i = 0; i < SAVED_PIECES<VALUES>; i++) {
        int row, col;
        if (saved_piece<VALUES>(i, row, col))
            *reinterpret_cast<uint4*>(dst + row * N + col) =
                *reinterpret_cast<const uint4*>(Sh + row * ldv<VALUES> + col);
    }
}
template <int VALUES>
__device__ __forceinline__ void load_saved_columns(const bf16* src, SavedColumns<VALUES>& s) {
#pragma unroll
    for (int i = 0; i < SAVED_PIECES<VALUES>; i++) {
        int row, col;
        if (saved_piece<VALUES>(i, row, col)) s.piece[i] = *reinterpret_cast<const uint4*>(src + row * N + col);
    }
}
template <int VALUES>
__device__ __forceinline__ void store_saved_columns(const SavedColumns<VALUES>& s, bf16* Sh) {
#pragma unroll
    for (int i = 0; i < SAVED_PIECES<VALUES>; i++) {
        int row, col;
        if (saved_piece<VALUES>(i, row, col)) *reinterpret_cast<uint4*>(Sh + row * ldv<VALUES> + col) = s.piece[i];
    }
}

struct Inputs {
    const bf16 *r, *k, *v;
    const float *lw, *u;
    bool lw_per_step;  // lw is [B, T, H, N] (RWKV-6), else one [H, N] for every step (RWKV-5)
};

// A chunk's inputs as loaded, in 16-byte pieces (`Pieces`): r and k of the chunk's steps, v of the
// block's VALUES value channels (from v0), and every step's log-decays where they are per step
// (RWKV-6), all loaded before any is used (one memory latency per chunk, not one per step).
template <int VALUES>
struct ChunkLoads {
    Pieces<float, N> lw;           // 0 past the end; loaded only where lw is per step
    Pieces<bf16, N> r, k;          // 0 past the end
    Pieces<bf16, VALUES> v;        // 0 past the end
};

template <int VALUES>
__device__ __forceinline__ void load_chunk(const Inputs& in, const HeadRows& rows, int t0, int steps, int v0,
                                           ChunkLoads<VALUES>& x) {
    if (in.lw_per_step) x.lw.load(in.lw, rows, t0, steps, 0);
    x.r.load(in.r, rows, t0, steps, 0), x.k.load(in.k, rows, t0, steps, 0);
    x.v.load(in.v, rows, t0, steps, v0);
}

// A chunk's loads into shared memory: the log-decays (where per step) into lw ([L][N] floats), r and k
// into rt and kt ([L][LDH], where chunk_factors reads them; the forward passes hat and ends, which it
// then overwrites in place), v into V. A barrier must follow before chunk_factors.
template <int VALUES>
__device__ __forceinline__ void stage_chunk(const ChunkLoads<VALUES>& x, bool lw_per_step, float* lw, bf16* rt,
                                            bf16* kt, bf16* V) {
    if (lw_per_step) x.lw.store(lw, N);
    x.r.store(rt, LDH), x.k.store(kt, LDH), x.v.store(V, ldv<VALUES>);
}

// The cumulative log-decays of channel n through every step of the chunk: c[t + 1] through step t,
// c[0] = 0, each step's log-decay (lw[t][n] from the staged tile, or lw_head at every step where lw
// is nullptr; 0 past `steps`) floored at LW_MIN. Returns the floored steps (bit t).
__device__ __forceinline__ unsigned cumulative(const float* lw, float lw_head, int n, int steps, float c[L + 1]) {
    unsigned clamped = 0;
    c[0] = 0.f;
#pragma unroll
    for (int t = 0; t < L; t++) {
        const float w = lw ? lw[t * N + n] : t < steps ? lw_head : 0.f;
        clamped |= unsigned(w < LW_MIN) << t, c[t + 1] = c[t] + fmaxf(w, LW_MIN);
    }
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

// One chunk's factor tiles (left, right, hat, ends over all N key channels; the bonus terms r u k in
// float32) from the staged inputs (lw as `cumulative` takes it, r and k at rt and kt, which may be hat
// and ends themselves), decay[n] = e^(c_L), and where given c_t into cum [L][N]. Each thread its own
// (step, channel) pairs, channel n = tid % N and PER consecutive steps; no synchronisation inside.
// Returns the thread's channel's floored steps.
__device__ __forceinline__ unsigned chunk_factors(const float* lw, float lw_head, int steps, const bf16* rt,
                                                  const bf16* kt, float u, bf16* left, bf16* right, bf16* hat,
                                                  bf16* ends, float* bonus, float* decay, float* cum) {
    const int n = threadIdx.x % N, group = threadIdx.x / N;
    float c[L + 1];
    const unsigned clamped = cumulative(lw, lw_head, n, steps, c);
    const float c_L = c[L], c_ref = 0.5f * c_L;
    if (group == 0) decay[n] = __expf(c_L);
#pragma unroll
    for (int j = 0; j < PER; j++) {
        float c_in, c_ex;
        pick(c, group, j, c_in, c_ex);
        const int t = group * PER + j, at = t * LDH + n;
        const float r = f32(rt[at]), k = f32(kt[at]);
        left[at] = to_bf16(r * __expf(c_ex - c_ref)), hat[at] = to_bf16(r * __expf(c_ex));
        right[at] = to_bf16(k * __expf(c_ref - c_in)), ends[at] = to_bf16(k * __expf(c_L - c_in));
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
template <int VALUES>
constexpr int STRIDE = THREADS / VALUES;  // steps between a thread's outputs of one value channel
static_assert(THREADS % N == 0 && L % (THREADS / 16) == 0, "whole steps of one value channel per thread");

template <int SPLIT>
__global__ void __launch_bounds__(THREADS, 4) forward_kernel(int T, int H, Inputs in, const float* __restrict__ s0,
                                                          bf16* __restrict__ y, float* __restrict__ s_final,
                                                          bf16* __restrict__ states) {
    using Part = wkvc::Part<SPLIT>;
    constexpr int VALUES = Part::VALUES, LDV = ldv<VALUES>;
    WKV_DYNAMIC_SMEM(smem);
    constexpr ForwardSmem<VALUES> F;
    float* S = reinterpret_cast<float*>(smem + F.S);  // the block's value columns
    bf16* Sh = reinterpret_cast<bf16*>(smem + F.Sh);
    bf16 *left = reinterpret_cast<bf16*>(smem + F.left), *right = reinterpret_cast<bf16*>(smem + F.right);
    bf16 *hat = reinterpret_cast<bf16*>(smem + F.hat), *ends = reinterpret_cast<bf16*>(smem + F.ends);
    bf16* V = reinterpret_cast<bf16*>(smem + F.V);
    float *bonus = reinterpret_cast<float*>(smem + F.bonus), *M = reinterpret_cast<float*>(smem + F.M);
    bf16* Mh = reinterpret_cast<bf16*>(smem + F.Mh);
    float *Y = reinterpret_cast<float*>(smem + F.Y), *parts = reinterpret_cast<float*>(smem + F.parts);
    float *diag = reinterpret_cast<float*>(smem + F.diag), *decay = reinterpret_cast<float*>(smem + F.decay);
    float* lw = in.lw_per_step ? reinterpret_cast<float*>(smem + F.lw) : nullptr;

    const Part part;
    const int b = blockIdx.y, h = part.h, tid = threadIdx.x;
    const HeadRows g(T, H, b, h);
    const int64_t head = int64_t(b) * H + h;
    const int chunks = (T + L - 1) / L;
    const float u = in.u[h * N + tid % N], lw_head = in.lw_per_step ? 0.f : in.lw[h * N + tid % N];
    load_columns<VALUES>(s0 + head * N * N + part.v0, S, Sh);
    __syncthreads();
    for (int c = 0; c < chunks; c++) {
        const int t0 = c * L, steps = min(L, T - t0);
        ChunkLoads<VALUES> x;
        load_chunk<VALUES>(in, g, t0, steps, part.v0, x);
        save_columns<VALUES>(Sh, states + (head * chunks + c) * N * N + part.v0);
        stage_chunk<VALUES>(x, in.lw_per_step, lw, hat, ends, V);  // r, k into hat, ends: chunk_factors overwrites
        __syncthreads();
        chunk_factors(lw, lw_head, steps, hat, ends, u, left, right, hat, ends, bonus, decay, nullptr);
        __syncthreads();
        if (tid < 32) tile_mma<row, col>(M, LDM, left, LDH, right, LDH, N, false);  // left right^T
        bonus_parts(bonus, parts, THREADS / 2);
        __syncthreads();
        mask_m(M, parts, Mh, diag);
        __syncthreads();
        matmul<row, row>(Y, LDV, Mh, LDM, V, LDV, L, VALUES, L, false);  // M V
        matmul<row, row>(Y, LDV, hat, LDH, Sh, LDV, L, VALUES, N, true);  // + hat S (each warp its own tiles)
        scale_rows<VALUES>(S, decay);
        __syncthreads();
        matmul<col, row>(S, LDV, ends, LDH, V, LDV, N, VALUES, L, true);  // S += ends^T V
        {  // y into left's place (free since M), one value channel at every STRIDE-th step per thread
            constexpr int EVERY = STRIDE<VALUES>;
            const int i = tid % VALUES;
#pragma unroll
            for (int t = tid / VALUES, q = 0; q < L / EVERY; q++, t += EVERY)
                left[t * LDH + i] = to_bf16(Y[t * LDV + i] + diag[t] * f32(V[t * LDV + i]));
        }
        __syncthreads();
        round_columns<VALUES>(S, Sh);
        Pieces<bf16, VALUES>::write(left, LDH, y, g, t0, steps, part.v0);
        __syncthreads();
    }
    store_columns<VALUES>(S, s_final + head * N * N + part.v0);
}

struct Grads {
    bf16 *dr, *dk, *dv;
    float *dlw, *du;  // dlw per step [B, T, H, N]; du per (batch, head) [B, H, N]
};

// Everything the backward reads from global memory for chunk c: the block's columns of its start
// state, its inputs and dy (of the block's values).
template <int VALUES>
struct BackwardLoads {
    SavedColumns<VALUES> start;
    ChunkLoads<VALUES> x;
    Pieces<bf16, VALUES> dy;
};
template <int VALUES>
__device__ __forceinline__ void load_backward(const Inputs& in, const bf16* dy, const bf16* states,
                                              const HeadRows& rows, int64_t head, int chunks, int c, int T, int v0,
                                              BackwardLoads<VALUES>& l) {
    const int t0 = c * L, steps = min(L, T - t0);
    load_saved_columns<VALUES>(states + (head * chunks + c) * N * N + v0, l.start);
    load_chunk<VALUES>(in, rows, t0, steps, v0, l.x);
    l.dy.load(dy, rows, t0, steps, v0);
}

// The sums over value columns that the key-side gradients need, where a head's values are split over
// the blocks of a cluster: all of dM (every block needs it; below the diagonal into dMh in bf16, the
// diagonal, the bonus' gradient, into dd), and the block's KEYS columns of d_ends and d_hat and its
// entries of Z plus the other blocks' partial sums of the same. Only the block's own columns and
// entries are written in place and the other blocks read only theirs, so nothing read is being written.
template <int SPLIT>
__device__ __forceinline__ void gather_key_sums(const Part<SPLIT>& part, const float* dM, bf16* dMh, float* dd,
                                                float* d_ends, float* d_hat, float* Z) {
    constexpr int KEYS = Part<SPLIT>::KEYS;
    const int tid = threadIdx.x;
#pragma unroll
    for (int q = 0; q < L * L / THREADS; q++) {
        const int e = tid + q * THREADS, t = e / L, s = e % L;
        float m = dM[t * LDM + s];
#pragma unroll
        for (int o = 1; o < SPLIT; o++) m += in_block(dM, (part.rank + o) % SPLIT)[t * LDM + s];
        if (s == t) dd[t] = m;
        dMh[t * LDM + s] = to_bf16(s < t ? m : 0.f);
    }
    if constexpr (SPLIT > 1) {
        for (int e = tid; e < 2 * L * KEYS; e += THREADS) {
            float* tile = e < L * KEYS ? d_ends : d_hat;
            const int q = e % (L * KEYS), at = q / KEYS * LDH + part.k0 + q % KEYS;
            float sum = tile[at];
#pragma unroll
            for (int o = 1; o < SPLIT; o++) sum += in_block(tile, (part.rank + o) % SPLIT)[at];
            tile[at] = sum;
        }
        for (int j = tid; j < KEYS; j += THREADS) {
            float z = Z[part.k0 + j];
#pragma unroll
            for (int o = 1; o < SPLIT; o++) z += in_block(Z, (part.rank + o) % SPLIT)[part.k0 + j];
            Z[part.k0 + j] = z;
        }
    }
}

template <int SPLIT>
__global__ void __launch_bounds__(THREADS, 2) backward_kernel(int T, int H, Inputs in, const bf16* __restrict__ dy,
                                                           const bf16* __restrict__ states,
                                                           const float* __restrict__ ds_final, Grads out,
                                                           float* __restrict__ ds0) {
    using Part = wkvc::Part<SPLIT>;
    constexpr int VALUES = Part::VALUES, KEYS = Part::KEYS, LDV = ldv<VALUES>;
    WKV_DYNAMIC_SMEM(smem);
    constexpr BackwardSmem<VALUES> B_;
    bf16* Sh = reinterpret_cast<bf16*>(smem + B_.Sh);  // the block's value columns of S, dS
    float* dS = reinterpret_cast<float*>(smem + B_.dS);
    bf16* dSh = reinterpret_cast<bf16*>(smem + B_.dSh);
    bf16 *left = reinterpret_cast<bf16*>(smem + B_.left), *right = reinterpret_cast<bf16*>(smem + B_.right);
    bf16 *hat = reinterpret_cast<bf16*>(smem + B_.hat), *ends = reinterpret_cast<bf16*>(smem + B_.ends);
    bf16 *rt = reinterpret_cast<bf16*>(smem + B_.rt), *kt = reinterpret_cast<bf16*>(smem + B_.kt);
    bf16 *V = reinterpret_cast<bf16*>(smem + B_.V), *dYh = reinterpret_cast<bf16*>(smem + B_.dY);
    float *bonus = reinterpret_cast<float*>(smem + B_.bonus), *M = reinterpret_cast<float*>(smem + B_.M);
    bf16* Mh = reinterpret_cast<bf16*>(smem + B_.Mh);
    float* dM = reinterpret_cast<float*>(smem + B_.dM);  // the block's partial sum
    bf16* dMh = reinterpret_cast<bf16*>(smem + B_.dMh);
    float *d_left = reinterpret_cast<float*>(smem + B_.d_left), *d_right = reinterpret_cast<float*>(smem + B_.d_right);
    float *d_hat = reinterpret_cast<float*>(smem + B_.d_hat), *d_ends = reinterpret_cast<float*>(smem + B_.d_ends);
    float *dV = reinterpret_cast<float*>(smem + B_.dV), *cum = reinterpret_cast<float*>(smem + B_.cum);
    float *Z = reinterpret_cast<float*>(smem + B_.Z), *decay = reinterpret_cast<float*>(smem + B_.decay);
    float *parts = reinterpret_cast<float*>(smem + B_.parts), *diag = reinterpret_cast<float*>(smem + B_.diag);
    float* dd = reinterpret_cast<float*>(smem + B_.dd);
    unsigned* clamped = reinterpret_cast<unsigned*>(smem + B_.clamped);

    float* lw = in.lw_per_step ? d_left : nullptr;  // the staged log-decays, in d_left's place until dM right

    const Part part;
    const int b = blockIdx.y, h = part.h, tid = threadIdx.x, warp = tid / 32;
    const int n = tid % N;  // the thread's channel as it builds the factors
    // ... and as it finishes the input gradients of the block's key channels
    constexpr int K_GROUPS = THREADS / KEYS, K_PER = L / K_GROUPS;  // threads per channel, steps per thread
    static_assert(THREADS % KEYS == 0 && L % K_GROUPS == 0 && K_PER >= 2, "whole steps of one channel per thread");
    const int kn = part.k0 + tid % KEYS, k_group = tid / KEYS, k_first = k_group * K_PER;
    const HeadRows g(T, H, b, h);
    const int64_t head = int64_t(b) * H + h;
    const int chunks = (T + L - 1) / L;
    const float u = in.u[h * N + n], u_k = in.u[h * N + kn], lw_head = in.lw_per_step ? 0.f : in.lw[h * N + n];
    float du = 0.f;  // sum over the thread's steps of channel kn of d_t r k
    load_columns<VALUES>(ds_final + head * N * N + part.v0, dS, dSh);
    BackwardLoads<VALUES> next;  // the chunk's global reads, issued while the chunk after it is worked on
    load_backward<VALUES>(in, dy, states, g, head, chunks, chunks - 1, T, part.v0, next);
    for (int c = chunks - 1; c >= 0; c--) {
        const int t0 = c * L, steps = min(L, T - t0);
        store_saved_columns<VALUES>(next.start, Sh);
        stage_chunk<VALUES>(next.x, in.lw_per_step, lw, rt, kt, V);
        next.dy.store(dYh, LDV);
        __syncthreads();
        if (c > 0) load_backward<VALUES>(in, dy, states, g, head, chunks, c - 1, T, part.v0, next);
        const unsigned clamped_steps = chunk_factors(lw, lw_head, steps, rt, kt, u, left, right, hat, ends, bonus,
                                                     decay, cum);
        if (tid < N) clamped[tid] = clamped_steps;
        __syncthreads();
        if (warp == 0) tile_mma<row, col>(M, LDM, left, LDH, right, LDH, N, false);     // left right^T
        if (warp == 1) tile_mma<row, col>(dM, LDM, dYh, LDV, V, LDV, VALUES, false);  // dY V^T (the block's part)
        bonus_parts(bonus, parts, THREADS / 2);
        matmul<row, col>(d_hat, LDH, dYh, LDV, Sh, LDV, L, N, VALUES, false);  // dY S^T (the block's part)
        matmul<row, col>(d_ends, LDH, V, LDV, dSh, LDV, L, N, VALUES, false);  // V dS^T (the block's part)
        if (tid < N) {  // Z_j = sum_i S[j,i] dS[j,i] over the block's values, before dS moves on
            float z = 0.f;
            for (int i = 0; i < VALUES; i++) z += f32(Sh[tid * LDV + i]) * dS[tid * LDV + i];
            Z[tid] = z;
        }
        sync_head<SPLIT>();  // every block's partial sums are made
        gather_key_sums<SPLIT>(part, dM, dMh, dd, d_ends, d_hat, Z);
        mask_m(M, parts, Mh, diag);
        scale_rows<VALUES>(dS, decay);
        sync_head<SPLIT>();  // and read: from here a block writes its own again
        matmul<col, row>(dV, LDV, Mh, LDM, dYh, LDV, L, VALUES, L, false);   // M^T dY
        matmul<row, row>(dV, LDV, ends, LDH, dSh, LDV, L, VALUES, N, true);  // + ends dS
        matmul<row, row>(d_left + part.k0, LDH, dMh, LDM, right + part.k0, LDH, L, KEYS, L, false);  // dM right
        matmul<col, row>(d_right + part.k0, LDH, dMh, LDM, left + part.k0, LDH, L, KEYS, L, false);  // dM^T left
        matmul<col, row>(dS, LDV, hat, LDH, dYh, LDV, N, VALUES, L, true);  // dS += hat^T dY
        __syncthreads();
        {  // dv of the block's values into V's place (free since V dS^T), one value channel at every
           // STRIDE-th step per thread
            constexpr int EVERY = STRIDE<VALUES>;
            const int i = tid % VALUES;
#pragma unroll
            for (int t = tid / VALUES, q = 0; q < L / EVERY; q++, t += EVERY)
                V[t * LDV + i] = to_bf16(dV[t * LDV + i] + diag[t] * f32(dYh[t * LDV + i]));
        }
        // The input gradients of key channel kn at the thread's steps, the last first; dlw_s = sum_{t>=s}
        // dc_t + sum_{t>s} dc_ex[t] + dc_L, summed over the thread's own steps as it goes. What the
        // channel's other threads need of it (the sum of dc_t + dc_ex over its steps, its terms of dc_L)
        // it leaves in two of its own (step, channel) places of d_right, which nobody else reads here.
        // dr and dk replace r and k in rt and kt (each place read and written by one thread), and go out
        // in pieces with dv after the barrier.
        {
            const float c_L = cum[(L - 1) * N + kn], c_ref = 0.5f * c_L;
            float suffix[K_PER], run = 0.f, dc_L = 0.f;
#pragma unroll
            for (int j = K_PER - 1; j >= 0; j--) {
                const int t = k_first + j, at = t * LDH + kn;
                const float c_in = cum[t * N + kn], c_ex = t > 0 ? cum[(t - 1) * N + kn] : 0.f;
                const float gl = d_left[at], gh = d_hat[at], gr = d_right[at], ge = d_ends[at];
                const float bonus_d = dd[t], r = f32(rt[at]), k = f32(kt[at]);
                rt[at] = to_bf16(gl * __expf(c_ex - c_ref) + gh * __expf(c_ex) + bonus_d * u_k * k);  // dr
                kt[at] = to_bf16(gr * __expf(c_ref - c_in) + ge * __expf(c_L - c_in) + bonus_d * u_k * r);  // dk
                du += bonus_d * r * k;
                const float t_end = ge * f32(ends[at]);
                run -= gr * f32(right[at]) + t_end;  // dc_t
                suffix[j] = run;
                run += gl * f32(left[at]) + gh * f32(hat[at]);  // dc_ex[t]
                dc_L += t_end;
            }
            d_right[k_first * LDH + kn] = run, d_right[(k_first + 1) * LDH + kn] = dc_L;
            round_columns<VALUES>(dS, dSh);
            __syncthreads();
            write_dlw<K_GROUPS, K_PER>(d_right, Z, decay, kn, k_group, suffix, clamped[kn], steps, out.dlw, g, t0);
            Pieces<bf16, VALUES>::write(V, LDV, out.dv, g, t0, steps, part.v0);
            Pieces<bf16, KEYS>::write(rt + part.k0, LDH, out.dr, g, t0, steps, part.k0);
            Pieces<bf16, KEYS>::write(kt + part.k0, LDH, out.dk, g, t0, steps, part.k0);
        }
        __syncthreads();
    }
    store_columns<VALUES>(dS, ds0 + head * N * N + part.v0);
    bonus[tid] = du;  // the channel's K_GROUPS partial sums (the bonus tile is free after the last chunk)
    __syncthreads();
    if (tid < KEYS) {
        float sum = 0.f;
#pragma unroll
        for (int other = 0; other < K_GROUPS; other++) sum += bonus[other * KEYS + tid];
        out.du[head * N + part.k0 + tid] = sum;
    }
}

// Launches, shared by the torch binding below and the CPU emulation in tests/cuda_cpu. split: the
// blocks per head (above 1 needs clusters in the backward, so sm_90 or later); false, launching
// nothing, for a split that is not valid_split.
inline bool launch_forward(cudaStream_t stream, int split, int B, int T, int H, Inputs in, const float* s0, bf16* y,
                           float* s_final, bf16* states) {
    return with_split(split, [&](auto s) {
        constexpr int SPLIT = decltype(s)::value;
        constexpr ForwardSmem<N / SPLIT> F;
        launch_heads<SPLIT>(forward_kernel<SPLIT>, F.bytes, false, stream, B, H, T, H, in, s0, y, s_final, states);
    });
}

inline bool launch_backward(cudaStream_t stream, int split, int B, int T, int H, Inputs in, const bf16* dy,
                            const bf16* states, const float* ds_final, Grads out, float* ds0) {
    return with_split(split, [&](auto s) {
        constexpr int SPLIT = decltype(s)::value;
        constexpr BackwardSmem<N / SPLIT> S;
        launch_heads<SPLIT>(backward_kernel<SPLIT>, S.bytes, true, stream, B, H, T, H, in, dy, states, ds_final, out,
                            ds0);
    });
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

// The kernels read and write r, k, v, per-step lw, dy, the outputs and the states 16 bytes at a time,
// so those must start 16-byte aligned.
void check(const Tensor& x, const char* name, at::ScalarType dtype, int64_t numel) {
    wkv_binding::check_aligned(OP, x, name, dtype, numel);
}

// lw is [B, T, H, N] (RWKV-6) or [H, N] (RWKV-5); u is [H, N].
wkvdc::Inputs inputs(const Tensor& r, const Tensor& lw, const Tensor& k, const Tensor& v, const Tensor& u,
                     const Tensor& states) {
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkvdc::N, "wkv_diag_chunked: inputs must be [B, T, H, ", wkvdc::N, "]");
    const int64_t n = r.numel(), heads = r.size(2) * wkvdc::N, chunks = (r.size(1) + wkvdc::L - 1) / wkvdc::L;
    for (auto [x, name] : {std::pair{r, "r"}, {k, "k"}, {v, "v"}}) check(x, name, at::kBFloat16, n);
    const bool per_step = lw.dim() == 4;
    check(lw, "lw", at::kFloat, per_step ? n : heads);
    wkv_binding::check(OP, u, "u", at::kFloat, heads);  // read by element
    const int64_t saved = r.size(0) * r.size(2) * chunks * wkvdc::N * wkvdc::N;
    check(states, "states", at::kBFloat16, saved);
    return wkvdc::Inputs{bf16_in(r), bf16_in(k), bf16_in(v), lw.data_ptr<float>(), u.data_ptr<float>(), per_step};
}

void check_split(int64_t split, const Tensor& on) {
    wkv_binding::check_split(OP, split, wkvdc::valid_split(int(split)), wkvdc::N, on);
}

void forward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor u, Tensor s0, Tensor y, Tensor s_final, Tensor states,
             int64_t split) {
    const wkvdc::Inputs in = inputs(r, lw, k, v, u, states);
    check_split(split, r);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t ns = int64_t(B) * H * wkvdc::N * wkvdc::N;
    check(y, "y", at::kBFloat16, r.numel());
    check(s0, "s0", at::kFloat, ns);
    check(s_final, "s_final", at::kFloat, ns);
    if (B == 0 || H == 0) return;
    wkvdc::launch_forward(c10::cuda::getCurrentCUDAStream(), int(split), B, T, H, in, s0.data_ptr<float>(), bf16_out(y),
                          s_final.data_ptr<float>(), bf16_out(states));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor u, Tensor states, Tensor dy, Tensor ds_final, Tensor dr,
              Tensor dlw, Tensor dk, Tensor dv, Tensor du, Tensor ds0, int64_t split) {
    const wkvdc::Inputs in = inputs(r, lw, k, v, u, states);
    check_split(split, r);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t n = r.numel(), ns = int64_t(B) * H * wkvdc::N * wkvdc::N;
    for (auto [x, name] : {std::pair{dy, "dy"}, {dr, "dr"}, {dk, "dk"}, {dv, "dv"}})
        check(x, name, at::kBFloat16, n);
    check(dlw, "dlw (per step)", at::kFloat, n);
    wkv_binding::check(OP, du, "du (per batch and head)", at::kFloat, int64_t(B) * H * wkvdc::N);
    check(ds_final, "ds_final", at::kFloat, ns);
    check(ds0, "ds0", at::kFloat, ns);
    if (B == 0 || H == 0) return;
    const wkvdc::Grads out{bf16_out(dr), bf16_out(dk), bf16_out(dv), dlw.data_ptr<float>(), du.data_ptr<float>()};
    wkvdc::launch_backward(c10::cuda::getCurrentCUDAStream(), int(split), B, T, H, in, bf16_in(dy), bf16_in(states),
                           ds_final.data_ptr<float>(), out, ds0.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.attr("head_size") = wkvdc::N;
    m.attr("chunk_len") = wkvdc::L;
    m.attr("log_decay_min") = wkvdc::LW_MIN;
    m.attr("splits") = wkv_binding::splits(wkvdc::valid_split);  // blocks a head's value columns may go to
    m.attr("saved") = std::vector<std::string>{"states"};  // what the forward writes for the backward
    m.def("forward", &forward,
          "chunked WKV-5/6 forward: writes y, the final state and every chunk's start state (bf16); "
          "split: blocks per head");
    m.def("backward", &backward,
          "chunked WKV-5/6 backward: writes dr, dlw (per step), dk, dv, du (per batch and head), ds0; "
          "split: blocks per head");
}
#endif  // WKV_KERNELS_ONLY
