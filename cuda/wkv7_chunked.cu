// RWKV-7 WKV, chunked: 16 steps at a time, the products on tensor cores (bf16 operands, float32
// accumulation), the state and every recurrence in float32. Same contract as wkv7.cu (the
// sequential kernel) plus two saved tensors, which the backward reads instead of recomputing the
// forward: the state at the start of every chunk and sa (x_t = S_{t-1} a_t, [B, T, H, N]), both in
// bf16, as the forward's products took them.
//
// One block per (batch, head) walks the chunks. Per chunk of L steps from state S (value i, key j),
// with c_t the cumulative log-decay through step t, c_ex its value through step t-1, the chunk's
// total c_L and its log-space middle c_ref = c_L / 2 (all per key channel):
//
//     left  = [a e^(c_ex - c_ref) ; r e^(c_t - c_ref)]     right = [b e^(c_ref - c_t) ; k e^(c_ref - c_t)]
//     hat   = [a e^(c_ex) ; r e^(c_t)]                     ends  = [b e^(c_L - c_t) ; k e^(c_L - c_t)]
//     M     = left right^T   (2L x 2L; blocks ab, ak strictly causal, rb, rk causal with the diagonal)
//     P     = hat S^T
//     x_t   = P_a[t] + sum_{s<t} (M_ab[t,s] x_s + M_ak[t,s] v_s)          (x_t = S_{t-1} a_t)
//     y_t   = P_r[t] + sum_{s<=t} (M_rb[t,s] x_s + M_rk[t,s] v_s)
//     S'    = S diag(e^(c_L)) + [X; V]^T ends
//
// M, P, y = P_r + M_r [X; V] and the state update run on tensor cores (M into y's product as two bf16
// parts, 16 bits of mantissa); the triangular recurrence for x runs in float32 on one thread per value
// channel. The split around c_ref keeps every factor within e^(|c_L| / 2); per-step log-decays below
// LW_MIN are taken as LW_MIN (see wkv7_chunked_cuda.py).
//
// Split heads. The state's value rows evolve independently (row i of S' needs row i of S, v_i and
// the key-side vectors), so a head's N value rows can be dealt out to SPLIT blocks, N / SPLIT each:
// more blocks when B * H alone would leave multiprocessors idle (B = 1 at long T). Each block
// builds the key-side factors and M itself. In the backward the key-side gradients (d left, d right,
// d ends, d hat, Z) are sums over value rows; the SPLIT blocks run as one thread block cluster,
// each adding the others' partial sums for its N / SPLIT key channels through distributed shared
// memory and writing those channels' input gradients. SPLIT = 1 is one block per head, no cluster.
//
// Backward per chunk, last chunk first, with dS the gradient of the chunk's end state, X read from sa
// and g as a triangular solve with T = (I - M_ab)^-1 on tensor cores (G = T^T dX):
//     dX_t  = (ends_b dS^T)[t] + sum_{s>=t} M_rb[s,t] dy_s
//     g_t   = dX_t + sum_{s>t} M_ab[s,t] g_s                                (g = d(rhs of the x system))
//     dv_t  = (ends_k dS^T)[t] + sum_{s>t} M_ak[s,t] g_s + sum_{s>=t} M_rk[s,t] dy_s     (a product, as y)
//     dM    = [g; dy] [X; V]^T  (masked as M)       d left = dM right      d right = dM^T left
//     d hat = [g; dy] S         d ends = [X; V] dS   Z_j = sum_i S[i,j] dS[i,j]
//     dS   <- dS diag(e^(c_L)) + [g; dy]^T hat
// and the chain through the exponents, each factor x e^(phi) adding g_x x to phi's gradient:
// dc_ex[t] = g_arel a_rel + g_ahat a_hat, dc_t = g_rrel r_rel + g_rhat r_hat - (g_brel b_rel + g_krel k_rel
// + g_bend b_end + g_kend k_end), dc_L = sum_t (g_bend b_end + g_kend k_end) + Z e^(c_L),
//     dlw_s = sum_{t>=s} dc_t + sum_{t>s} dc_ex[t] + dc_L.
// c_ref gets no gradient: sum(g_left left) = sum(dM * M) = sum(g_right right), so its terms cancel (the
// split point is free; the result does not depend on it).
#ifndef WKV_KERNELS_ONLY  // defined by `make cuda-check`: compile the kernels alone, fast
#include "wkv_binding.cuh"
#endif
#include "wkv_chunk_tiles.cuh"

namespace wkv7c {

using namespace wkvc;

constexpr int L2 = 2 * L;       // rows of the stacked (a; r) and (b; k) tiles
constexpr float LW_MIN = -5.f;  // per-step log-decay floor: factors stay within e^(8 * 5) = 2.4e17
constexpr int LDM = L2 + 8;     // leading dimension of the [2L][2L] tiles
static_assert(N % 16 == 0 && N >= 32 && N <= 64, "the chunked kernel is built for head sizes 32 and 64");

// A chunk's factors are built for two adjacent key channels per thread, n and n + 1 (n = 2 (tid %
// PAIRS)), PAIR_STEPS consecutive steps of them, so that every shared-memory access moves both
// channels at once (a bf16 pair, a float pair).
constexpr int PAIRS = N / 2, PAIR_GROUPS = THREADS / PAIRS, PAIR_STEPS = L / PAIR_GROUPS;
static_assert(THREADS % PAIRS == 0 && L % PAIR_GROUPS == 0, "whole steps of one channel pair per thread");


constexpr size_t STATE_F = size_t(N) * LDH * 4, STATE_H = size_t(N) * LDH * 2;
constexpr size_t TILE_H = size_t(L2) * LDH * 2, TILE_F = size_t(L2) * LDH * 4;
constexpr size_t SQUARE_F = size_t(L2) * LDM * 4, SQUARE_H = size_t(L2) * LDM * 2;

// The forward keeps under 56 KB at N = 64, so 4 blocks fit on an H100 multiprocessor (228 KB, 1 KB
// reserved per block): 528 resident blocks, one wave for B * H = 512. For that P = hat S^T is
// written over left and right once M = left right^T has read them.
struct ForwardSmem {
    size_t S, Sh, left, right, hat, ends, xv, M, P, decay, bytes;
    __host__ __device__ constexpr ForwardSmem()
        : S(), Sh(), left(), right(), hat(), ends(), xv(), M(), P(), decay(), bytes() {
        Carve c;
        S = c.take(STATE_F), Sh = c.take(STATE_H);
        left = P = c.take(larger(2 * TILE_H, TILE_F)), right = left + TILE_H;
        hat = c.take(TILE_H), ends = c.take(TILE_H), xv = c.take(TILE_H);
        M = c.take(SQUARE_F), decay = c.take(N * 4);
        bytes = c.end;
    }
};
static_assert(TILE_H % 128 == 0, "right starts 128-byte aligned");
static_assert(SQUARE_F <= TILE_F, "the backward keeps M^T in d_ends' tile until d_ends is made");
static_assert(size_t(L) * N * 4 <= SQUARE_F, "a chunk's log-decays are staged in M's place");
static_assert(N != 64 || ForwardSmem().bytes + 1024 <= 228 * 1024 / 4, "4 forward blocks per multiprocessor");

struct BackwardSmem {
    size_t Sh, dS, dSh, left, right, hat, ends, xv, dr, M, dMh, f0, f1, f2, f3, cum, Z, decay, clamped, bytes;
    __host__ __device__ constexpr BackwardSmem()
        : Sh(), dS(), dSh(), left(), right(), hat(), ends(), xv(), dr(), M(), dMh(), f0(), f1(), f2(), f3(), cum(), Z(),
          decay(), clamped(), bytes() {
        Carve c;
        Sh = c.take(STATE_H), dS = c.take(STATE_F), dSh = c.take(STATE_H);
        left = c.take(TILE_H), right = c.take(TILE_H), hat = c.take(TILE_H), ends = c.take(TILE_H), xv = c.take(TILE_H);
        dr = c.take(TILE_H);
        M = c.take(SQUARE_F), dMh = c.take(SQUARE_H);
        f0 = c.take(TILE_F), f1 = c.take(TILE_F), f2 = c.take(TILE_F), f3 = c.take(TILE_F);
        cum = c.take(size_t(L) * N * 4), Z = c.take(N * 4), decay = c.take(N * 4);
        clamped = c.take(PAIR_GROUPS * N * 4);
        bytes = c.end;
    }
};

struct Inputs {
    const bf16 *r, *k, *v, *a, *b;
    const float* lw;
};

// A chunk's inputs as loaded, in 16-byte pieces (`Pieces`): every step's log-decays and a, r, b, k
// of the chunk's steps, and v of the block's VALUES value channels (from v0). A chunk's loads are its
// longest wait, so each thread issues all of its loads before it uses any (one memory latency per
// chunk instead of one per step), and nothing waits for them until stage_chunk, so the backward can
// load the next chunk while it works on this one.
template <int VALUES>
struct ChunkLoads {
    Pieces<float, N> lw;                  // 0 past the end
    Pieces<bf16, N> a, r, b, k;           // 0 past the end
    Pieces<bf16, VALUES> v;               // 0 past the end
};

template <int VALUES>
__device__ __forceinline__ void load_chunk(const Inputs& in, const HeadRows& rows, int t0, int steps, int v0,
                                           ChunkLoads<VALUES>& x) {
    x.lw.load(in.lw, rows, t0, steps, 0);
    x.a.load(in.a, rows, t0, steps, 0), x.r.load(in.r, rows, t0, steps, 0);
    x.b.load(in.b, rows, t0, steps, 0), x.k.load(in.k, rows, t0, steps, 0);
    x.v.load(in.v, rows, t0, steps, v0);
}

// A chunk's loads into shared memory where chunk_factors reads them: the log-decays into lw ([L][N]
// floats), a and r into hat's rows, b and k into ends' (chunk_factors turns them into the factors in
// place), v into rows L.. of xv. A barrier must follow before chunk_factors.
template <int VALUES>
__device__ __forceinline__ void stage_chunk(const ChunkLoads<VALUES>& x, float* lw, bf16* hat, bf16* ends, bf16* xv) {
    x.lw.store(lw, N);
    x.a.store(hat, LDH), x.r.store(hat + L * LDH, LDH), x.b.store(ends, LDH), x.k.store(ends + L * LDH, LDH);
    x.v.store(xv + L * LDH, LDH);
}

// Builds one chunk's factor tiles from its staged inputs (left, right, and hat and ends in place of
// the a, r, b, k staged there), decay[n] = e^(c_L), and where cum is given, c_t into cum [L][N] and
// the clamped steps into clamped ([PAIR_GROUPS][N]; `clamped_steps` reads them). Each thread its own
// (step, channel pair)s; no synchronisation inside.
__device__ __forceinline__ void chunk_factors(const float* lw, bf16* left, bf16* right, bf16* hat, bf16* ends,
                                              float* decay, float* cum, unsigned* clamped) {
    const int n = threadIdx.x % PAIRS * 2, group = threadIdx.x / PAIRS, first = group * PAIR_STEPS;
    float c[2][L + 1];  // c[q][t + 1]: channel n + q's cumulative log-decay through step t
    c[0][0] = c[1][0] = 0.f;
#pragma unroll
    for (int t = 0; t < L; t++) {
        const float2 w = *reinterpret_cast<const float2*>(lw + t * N + n);
        c[0][t + 1] = c[0][t] + fmaxf(w.x, LW_MIN), c[1][t + 1] = c[1][t] + fmaxf(w.y, LW_MIN);
    }
    if (clamped) {  // the thread's own steps only: the PAIR_GROUPS words of a channel make its mask
        unsigned floored[2] = {0, 0};
#pragma unroll
        for (int j = 0; j < PAIR_STEPS; j++) {
            const float2 w = *reinterpret_cast<const float2*>(lw + (first + j) * N + n);
            floored[0] |= unsigned(w.x < LW_MIN) << (first + j), floored[1] |= unsigned(w.y < LW_MIN) << (first + j);
        }
        clamped[group * N + n] = floored[0], clamped[group * N + n + 1] = floored[1];
    }
    // The thread's c from step first - 1 on (mine[q][j]: through step first + j - 1), picked by a
    // select per group: indexing c with the run-time first would move it to local memory.
    float mine[2][PAIR_STEPS + 1];
#pragma unroll
    for (int q = 0; q < 2; q++)
#pragma unroll
        for (int j = 0; j <= PAIR_STEPS; j++) {
            mine[q][j] = c[q][j];
#pragma unroll
            for (int other = 1; other < PAIR_GROUPS; other++)
                if (group == other) mine[q][j] = c[q][other * PAIR_STEPS + j];
        }
    // Every factor from two exponentials per step: e^(c_in) (the next step's e^(c_ex)) and
    // e^(c_ref - c_in), and the channel's e^(+-c_ref); all stay within float32's normal range
    // (c >= L * LW_MIN = -80).
    float c_ref[2], up[2], down[2], e_ex[2];
#pragma unroll
    for (int q = 0; q < 2; q++)
        c_ref[q] = 0.5f * c[q][L], up[q] = __expf(c_ref[q]), down[q] = __expf(-c_ref[q]), e_ex[q] = __expf(mine[q][0]);
    if (group == 0) *reinterpret_cast<float2*>(decay + n) = make_float2(up[0] * up[0], up[1] * up[1]);
    using Pair = __nv_bfloat162;
    const auto at = [n](bf16* tile, int row) { return reinterpret_cast<Pair*>(tile + row * LDH + n); };
#pragma unroll
    for (int j = 0; j < PAIR_STEPS; j++) {
        const int t = first + j;
        const Pair a = *at(hat, t), r = *at(hat, L + t), b = *at(ends, t), k = *at(ends, L + t);
        float out[8][2];  // left a, r, right b, k, hat a, r, ends b, k, of channels n and n + 1
#pragma unroll
        for (int q = 0; q < 2; q++) {
            const float c_in = mine[q][j + 1], e_in = __expf(c_in), to_ref = __expf(c_ref[q] - c_in);
            const float to_end = to_ref * up[q];
            const float aq = f32(q ? a.y : a.x), rq = f32(q ? r.y : r.x);
            const float bq = f32(q ? b.y : b.x), kq = f32(q ? k.y : k.x);
            out[0][q] = aq * (e_ex[q] * down[q]), out[1][q] = rq * (e_in * down[q]);
            out[2][q] = bq * to_ref, out[3][q] = kq * to_ref;
            out[4][q] = aq * e_ex[q], out[5][q] = rq * e_in;
            out[6][q] = bq * to_end, out[7][q] = kq * to_end;
            e_ex[q] = e_in;
        }
        bf16* tiles[8] = {left, left, right, right, hat, hat, ends, ends};
#pragma unroll
        for (int o = 0; o < 8; o++) *at(tiles[o], o % 2 * L + t) = __floats2bfloat162_rn(out[o][0], out[o][1]);
        if (cum) *reinterpret_cast<float2*>(cum + t * N + n) = make_float2(mine[0][j + 1], mine[1][j + 1]);
    }
}

// Channel n's clamped steps as chunk_factors left them (bit t: step t's log-decay was below LW_MIN and
// was taken as LW_MIN, so its gradient is 0).
__device__ __forceinline__ unsigned clamped_steps(const unsigned* clamped, int n) {
    unsigned steps = 0;
#pragma unroll
    for (int group = 0; group < PAIR_GROUPS; group++) steps |= clamped[group * N + n];
    return steps;
}

// acc + sum_{s = from}^{to} row[s] x[s], adding in increasing s, for a 16-byte aligned row of floats
// read 4 at a time (one broadcast when a warp shares the row). from and to are constants once the
// caller's loops unroll, so the bounds cost nothing.
__device__ __forceinline__ float row_dot(float acc, const float* row, const float x[L], int from, int to) {
#pragma unroll
    for (int q = 0; q < L; q += 4) {
        if (q + 3 < from || q > to) continue;
        const float4 m = load4(row + q);
        const float mq[4] = {m.x, m.y, m.z, m.w};
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (q + e >= from && q + e <= to) acc += mq[e] * x[q + e];
    }
    return acc;
}

// x_t = P[t] + sum_{s<t} (M_ab[t,s] x_s + M_ak[t,s] v_s) for one value channel, in float32, row by
// row: the v terms first, then the x terms in increasing s, so each row's last multiply-add is the
// only one waiting for x_{t-1} and the dependent chain is one multiply-add per step.
__device__ __forceinline__ void solve_x(const float* M, const float* P, int i, const float v[L], float x[L]) {
#pragma unroll
    for (int t = 0; t < L; t++) {
        const float* m = M + t * LDM;
        x[t] = row_dot(row_dot(P[t * LDH + i], m + L, v, 0, t - 1), m, x, 0, t - 1);
    }
}


// Columns s .. s + 3 of a float32 row of M (or M^T), those that keep(column) and zero the others,
// as the bf16 rounding of each (into hi) and the bf16 rounding of what that leaves (into lo): hi + lo
// carries 16 bits of mantissa into a tensor-core product, where bf16 alone would carry 8.
template <typename Keep>
__device__ __forceinline__ void split_bf16x4(float4 m, int s, Keep keep, bf16* hi, bf16* lo) {
    const float mq[4] = {m.x, m.y, m.z, m.w};
    float h[4], l[4];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const float kept = keep(s + q) ? mq[q] : 0.f;
        h[q] = f32(to_bf16(kept)), l[q] = kept - h[q];
    }
    store_bf16x4(hi + s, make_float4(h[0], h[1], h[2], h[3]));
    store_bf16x4(lo + s, make_float4(l[0], l[1], l[2], l[3]));
}

// The chunk's first `steps` rows of an output of the block's VALUES value channels (y, dv: [L][LDH]
// floats in shared memory) to global memory in bf16, 16 bytes (8 channels of a step) per access.
template <int VALUES>
__device__ __forceinline__ void write_rows(const float* Y, bf16* y, const HeadRows& g, int t0, int steps, int v0) {
    using Out = Pieces<bf16, VALUES>;
#pragma unroll
    for (int i = 0; i < Out::PER_THREAD; i++) {
        const int t = Out::step(i), n = Out::column(i);
        if (Out::has(i) && t < steps) {
            const float* row = Y + t * LDH + n;
            *reinterpret_cast<uint4*>(y + g.at(t0 + t, v0 + n)) = to_bf16x8(load4(row), load4(row + 4));
        }
    }
}

// T = (I - A)^-1 for A the strictly lower triangle of a 16 x 16 float tile (rows at lda), column j by
// the calling thread: T[t][j] = (t == j) + sum_{s<t} A[t][s] T[s][j], row by row, each row's older
// terms first so that only its last multiply-add waits on the row before. Into t_hi and t_lo
// ([L][LDT] bf16) as the bf16 rounding of each entry and of the rest, as split_bf16x4 does.
constexpr int LDT = L + 8;  // leading dimension of the [L][L] bf16 tiles of the triangular solves
__device__ __forceinline__ void inverse_column(const float* A, int lda, int j, bf16* t_hi, bf16* t_lo) {
    float col[L];
#pragma unroll
    for (int t = 0; t < L; t++) col[t] = row_dot(t == j ? 1.f : 0.f, A + t * lda, col, 0, t - 1);
#pragma unroll
    for (int t = 0; t < L; t++) {
        const bf16 hi = to_bf16(col[t]);
        t_hi[t * LDT + j] = hi, t_lo[t * LDT + j] = to_bf16(col[t] - f32(hi));
    }
}

// A unit upper triangular system on tensor cores, by each warp for its 16-column tiles of the block's
// VALUES value channels: R (+)= A B (A as a_hi + a_lo, [L][LDT]; B: [L][LDH]), then W = T^T R (T
// lower triangular, as t_hi + t_lo), W in bf16 into out ([L][LDH]). R is float [L][LDH] and ends
// holding W in float32; out holds R in bf16 in between. Only the warp's own tiles are touched, so the
// steps are ordered by __syncwarp.
template <int VALUES>
__device__ __forceinline__ void solve_tiles(float* R, const bf16* a_hi, const bf16* a_lo, const bf16* b,
                                            const bf16* t_hi, const bf16* t_lo, bf16* out) {
    const int lane = threadIdx.x % 32;
    const auto to_out = [&](int c) {  // the warp's tile of R, as bf16 into out, 4 columns per access
#pragma unroll
        for (int q = lane; q < L * 4; q += 32) {
            const int at = q / 4 * LDH + c + q % 4 * 4;
            store_bf16x4(out + at, load4(R + at));
        }
    };
    for (int c = threadIdx.x / 32 * 16; c < VALUES; c += WARPS * 16) {
        tile_mma<row, row>(R + c, LDH, a_hi, LDT, b + c, LDH, L, true, nullptr, 0, a_lo);
        __syncwarp();
        to_out(c);
        __syncwarp();
        tile_mma<col, row>(R + c, LDH, t_hi, LDT, out + c, LDH, L, false, nullptr, 0, t_lo);
        __syncwarp();
        to_out(c);
    }
}

template <int SPLIT>
__global__ void __launch_bounds__(THREADS, 4) forward_kernel(int T, int H, Inputs in, const float* __restrict__ s0,
                                                          bf16* __restrict__ y, float* __restrict__ s_final,
                                                          bf16* __restrict__ states, bf16* __restrict__ sa) {
    WKV_DYNAMIC_SMEM(smem);
    constexpr ForwardSmem F;
    float* S = reinterpret_cast<float*>(smem + F.S);  // the block's VALUES rows
    bf16* Sh = reinterpret_cast<bf16*>(smem + F.Sh);
    bf16 *left = reinterpret_cast<bf16*>(smem + F.left), *right = reinterpret_cast<bf16*>(smem + F.right);
    bf16 *hat = reinterpret_cast<bf16*>(smem + F.hat), *ends = reinterpret_cast<bf16*>(smem + F.ends);
    bf16* xv = reinterpret_cast<bf16*>(smem + F.xv);  // [X; V], the block's VALUES columns
    float *M = reinterpret_cast<float*>(smem + F.M), *P = reinterpret_cast<float*>(smem + F.P);
    float* decay = reinterpret_cast<float*>(smem + F.decay);

    using Part = wkv7c::Part<SPLIT>;
    constexpr int VALUES = Part::VALUES;
    const Part part;
    const int b = blockIdx.y, tid = threadIdx.x;
    const HeadRows g(T, H, b, part.h);
    const int64_t head = int64_t(b) * H + part.h, rows = int64_t(part.v0) * N;  // rows: the block's first state row
    const int chunks = (T + L - 1) / L;
    load_state<VALUES>(s0 + head * N * N + rows, S, Sh);
    __syncthreads();
    for (int c = 0; c < chunks; c++) {
        const int t0 = c * L, steps = min(L, T - t0);
        bf16* saved = states + (head * chunks + c) * N * N + rows;
        ChunkLoads<VALUES> x;
        load_chunk<VALUES>(in, g, t0, steps, part.v0, x);
        save_state<VALUES>(Sh, saved);
        stage_chunk<VALUES>(x, M, hat, ends, xv);  // M is free until the first product
        __syncthreads();
        chunk_factors(M, left, right, hat, ends, decay, nullptr, nullptr);
        __syncthreads();
        matmul<row, col>(M, LDM, left, LDH, right, LDH, L2, L2, N, false);  // left right^T
        __syncthreads();  // P overwrites left and right
        matmul<row, col>(P, LDH, hat, LDH, Sh, LDH, L2, VALUES, N, false);  // hat S^T
        __syncthreads();
        // One thread per value channel solves for x (into xv's first rows, in bf16); the others put M's
        // r rows, masked causal (the diagonal kept), into hat's place (free since hat S^T) as the bf16
        // rounding of each entry (m_hi, rows 0..) and of the rest (m_lo, rows L..), so that y's product
        // below has 16 bits of M's mantissa (with M in bf16 alone, y's error grows by a fifth).
        bf16 *m_hi = hat, *m_lo = hat + L * LDH;
        if (tid < VALUES) {
            float v[L], x[L];
#pragma unroll
            for (int s = 0; s < L; s++) v[s] = f32(xv[(L + s) * LDH + tid]);
            solve_x(M, P, tid, v, x);
#pragma unroll
            for (int t = 0; t < L; t++) xv[t * LDH + tid] = to_bf16(x[t]);
        } else {
            for (int e = tid - VALUES; e < L * L2 / 4; e += THREADS - VALUES) {  // 4 columns at a time
                const int t = e / (L2 / 4), s = e % (L2 / 4) * 4;
                split_bf16x4(load4(M + (L + t) * LDM + s), s, [t](int col) { return col % L <= t; }, m_hi + t * LDH,
                             m_lo + t * LDH);
            }
        }
        scale_columns<VALUES>(S, decay);
        __syncthreads();
        // y = P_r + M_r [X; V] (M_r: M's r rows, as m_hi + m_lo) into P's r rows, beside S += [X; V]^T ends
        matmul<row, row>(P + L * LDH, LDH, m_hi, LDH, xv, LDH, L, VALUES, L2, true, nullptr, 0, m_lo);
        matmul<col, row>(S, LDH, xv, LDH, ends, LDH, VALUES, N, L2, true);
        __syncthreads();
        round_state<VALUES>(S, Sh);
        write_rows<VALUES>(P + L * LDH, y, g, t0, steps, part.v0);
        Pieces<bf16, VALUES>::write(xv, LDH, sa, g, t0, steps, part.v0);  // X as the products took it
        __syncthreads();
    }
    store_state<VALUES>(S, s_final + head * N * N + rows);
}

struct Grads {
    bf16 *dr, *dk, *dv, *da, *db;
    float* dlw;
};

// Everything the backward reads from global memory for chunk c: the block's rows of its start state,
// its inputs, and sa and dy of the same steps and the block's value channels.
template <int VALUES>
struct BackwardLoads {
    SavedState<VALUES> start;
    ChunkLoads<VALUES> x;
    Pieces<bf16, VALUES> sa, dy;
};
struct Saved {
    const bf16 *states, *sa;
};
template <int VALUES>
__device__ __forceinline__ void load_backward(const Inputs& in, const bf16* dy, const Saved& saved,
                                              const HeadRows& rows, int64_t head, int chunks, int c, int T, int v0,
                                              BackwardLoads<VALUES>& l) {
    const int t0 = c * L, steps = min(L, T - t0);
    load_saved<VALUES>(saved.states + (head * chunks + c) * N * N + int64_t(v0) * N, l.start);
    load_chunk<VALUES>(in, rows, t0, steps, v0, l.x);
    l.sa.load(saved.sa, rows, t0, steps, v0), l.dy.load(dy, rows, t0, steps, v0);
}

// The block's part of the sums over value rows that the key-side gradients need: its KEYS columns
// of d_ends and d_hat (and its entries of Z) plus the other blocks' partial sums of the same, and
// all of dM (every block needs it), masked as M, into bf16. Only the block's own columns of its
// d_ends, d_hat and Z are written here and the other blocks read only theirs, so nothing read is
// being written.
template <int SPLIT>
__device__ __forceinline__ void gather_key_sums(const Part<SPLIT>& part, const float* dM, bf16* dMh, float* d_ends,
                                                float* d_hat, float* Z) {
    constexpr int KEYS = Part<SPLIT>::KEYS;
    const int tid = threadIdx.x;
    static_assert(L2 * L2 % (4 * THREADS) == 0, "whole 4-column pieces of dM per thread");
#pragma unroll
    for (int q = 0; q < L2 * L2 / (4 * THREADS); q++) {  // dM masked as M, in bf16, 4 columns at a time
        const int e = tid + q * THREADS, t = e / (L2 / 4), col = e % (L2 / 4) * 4;
        const auto causal = [t](int s) { return t < L ? s % L < t : s % L <= t - L; };
        float4 m = load4(dM + t * LDM + col);
#pragma unroll
        for (int o = 1; o < SPLIT; o++)
            m = add4(m, load4(in_block(dM, (part.rank + o) % SPLIT) + t * LDM + col));
        float4 masked = m;
        masked.x = causal(col) ? m.x : 0.f, masked.y = causal(col + 1) ? m.y : 0.f;
        masked.z = causal(col + 2) ? m.z : 0.f, masked.w = causal(col + 3) ? m.w : 0.f;
        store_bf16x4(dMh + t * LDM + col, masked);
    }
    if constexpr (SPLIT > 1) {
        for (int e = tid; e < 2 * L2 * KEYS / 4; e += THREADS) {  // d_ends then d_hat, 4 columns at a time
            float* tile = e < L2 * KEYS / 4 ? d_ends : d_hat;
            const int q = e % (L2 * KEYS / 4), at = q / (KEYS / 4) * LDH + part.k0 + q % (KEYS / 4) * 4;
            float4 sum = load4(tile + at);
#pragma unroll
            for (int o = 1; o < SPLIT; o++) sum = add4(sum, load4(in_block(tile, (part.rank + o) % SPLIT) + at));
            store4(tile + at, sum);
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
                                                           Saved saved, const float* __restrict__ ds_final, Grads out,
                                                           float* __restrict__ ds0) {
    WKV_DYNAMIC_SMEM(smem);
    constexpr BackwardSmem B_;
    bf16* Sh = reinterpret_cast<bf16*>(smem + B_.Sh);  // the block's VALUES rows of S, dS
    float* dS = reinterpret_cast<float*>(smem + B_.dS);
    bf16* dSh = reinterpret_cast<bf16*>(smem + B_.dSh);
    bf16 *left = reinterpret_cast<bf16*>(smem + B_.left), *right = reinterpret_cast<bf16*>(smem + B_.right);
    bf16 *hat = reinterpret_cast<bf16*>(smem + B_.hat), *ends = reinterpret_cast<bf16*>(smem + B_.ends);
    bf16 *xv = reinterpret_cast<bf16*>(smem + B_.xv), *gdy = reinterpret_cast<bf16*>(smem + B_.dr);  // VALUES columns
    float* M = reinterpret_cast<float*>(smem + B_.M);  // M, then dM (the block's partial sum)
    bf16* dMh = reinterpret_cast<bf16*>(smem + B_.dMh);
    float* d_left = reinterpret_cast<float*>(smem + B_.f0);  // the block's KEYS columns
    float* E = reinterpret_cast<float*>(smem + B_.f1);       // ends dS^T, then G and dv, then d right
    float* d_ends = reinterpret_cast<float*>(smem + B_.f2);  // [X; V] dS
    float* MT = d_ends;                                      // before it: M^T ([2L][LDM])
    float* d_hat = reinterpret_cast<float*>(smem + B_.f3);   // the solves' bf16 tiles, then [g; dy] S
    float *cum = reinterpret_cast<float*>(smem + B_.cum), *Z = reinterpret_cast<float*>(smem + B_.Z);
    float* decay = reinterpret_cast<float*>(smem + B_.decay);
    unsigned* clamped = reinterpret_cast<unsigned*>(smem + B_.clamped);  // chunk_factors' clamped steps

    using Part = wkv7c::Part<SPLIT>;
    constexpr int VALUES = Part::VALUES, KEYS = Part::KEYS;
    const Part part;
    const int b = blockIdx.y, tid = threadIdx.x, k0 = part.k0;
    const HeadRows g(T, H, b, part.h);
    const int64_t head = int64_t(b) * H + part.h, rows = int64_t(part.v0) * N;
    const int chunks = (T + L - 1) / L;
    load_state<VALUES>(ds_final + head * N * N + rows, dS, dSh);
    BackwardLoads<VALUES> next;  // the chunk's global reads, issued while the chunk after it is worked on
    load_backward<VALUES>(in, dy, saved, g, head, chunks, chunks - 1, T, part.v0, next);
    for (int c = chunks - 1; c >= 0; c--) {
        const int t0 = c * L, steps = min(L, T - t0);
        store_saved<VALUES>(next.start, Sh);
        stage_chunk<VALUES>(next.x, M, hat, ends, xv);  // M is free until the first product
        next.sa.store(xv, LDH), next.dy.store(gdy + L * LDH, LDH);
        __syncthreads();
        if (c > 0) load_backward<VALUES>(in, dy, saved, g, head, chunks, c - 1, T, part.v0, next);
        chunk_factors(M, left, right, hat, ends, decay, cum, clamped);
        __syncthreads();
        matmul<row, col>(M, LDM, left, LDH, right, LDH, L2, L2, N, false, MT, LDM);  // M = left right^T, and M^T
        matmul<row, col>(E, LDH, ends, LDH, dSh, LDH, L2, VALUES, N, false);         // ends dS^T
        __syncthreads();
        // g solves the transpose of x's unit lower triangular system (I - M_ab) X = P_a + M_ak V:
        //     G = T^T (E_b + M_rb^T dY)        T = (I - M_ab)^-1,
        // M_rb^T with its diagonal. The first warp builds T (a column on each of its first 16 threads;
        // the rest of it waits rather than take other work, which the warp would run after T's), the
        // threads from the second warp to the last N put M_rb^T and (for dv below) M's k columns into
        // bf16 hi and lo parts, the last N sum Z; after the barrier each warp solves its value tiles on
        // tensor cores. T and M_rb^T sit in d_hat's place (free until d_hat is made).
        bf16 *t_hi = reinterpret_cast<bf16*>(d_hat), *t_lo = t_hi + L * LDT, *rb_hi = t_lo + L * LDT;
        bf16* rb_lo = rb_hi + L * LDT;
        bf16 *mt_hi = dMh, *mt_lo = dMh + L * LDM;  // dv's: M's k columns (rows L.. of MT), in dMh's place
        static_assert(THREADS - N > 32, "a warp for T, and threads for the conversions beside Z's N");
        if (tid < 32) {
            if (tid < L) inverse_column(M, LDM, tid, t_hi, t_lo);
        } else if (tid < THREADS - N) {
            // 4 columns at a time: M_rb^T (rows t of MT, columns L..), then M_k^T for dv (rows L + t of
            // MT, all 2L columns)
            for (int e = tid - 32; e < L * L / 4 + L * L2 / 4; e += THREADS - N - 32) {
                if (e < L * L / 4) {
                    const int t = e / (L / 4), s = e % (L / 4) * 4;
                    split_bf16x4(load4(MT + t * LDM + L + s), s, [t](int col) { return col >= t; }, rb_hi + t * LDT,
                                 rb_lo + t * LDT);
                } else {
                    const int t = (e - L * L / 4) / (L2 / 4), s = e % (L2 / 4) * 4;
                    split_bf16x4(load4(MT + (L + t) * LDM + s), s,
                                 [t](int col) { return col < L ? col > t : col - L >= t; }, mt_hi + t * LDM,
                                 mt_lo + t * LDM);
                }
            }
        } else {  // Z_j = sum_i S[i,j] dS[i,j] over the block's rows, before dS moves on
            const int j = tid - (THREADS - N);
            float z = 0.f;
            for (int i = 0; i < VALUES; i++) z += f32(Sh[i * LDH + j]) * dS[i * LDH + j];
            Z[j] = z;
        }
        __syncthreads();
        solve_tiles<VALUES>(E, rb_hi, rb_lo, gdy + L * LDH, t_hi, t_lo, gdy);  // G into gdy's first rows
        __syncthreads();
        matmul<row, col>(M, LDM, gdy, LDH, xv, LDH, L2, L2, VALUES, false);      // dM = [g; dy] [X; V]^T
        matmul<row, row>(d_ends, LDH, xv, LDH, dSh, LDH, L2, N, VALUES, false);  // [X; V] dS
        matmul<row, row>(d_hat, LDH, gdy, LDH, Sh, LDH, L2, N, VALUES, false);   // [g; dy] S
        matmul<row, row>(E + L * LDH, LDH, mt_hi, LDM, gdy, LDH, L, VALUES, L2, true, nullptr, 0, mt_lo);  // dv
        sync_head<SPLIT>();  // every block's partial sums are made
        write_rows<VALUES>(E + L * LDH, out.dv, g, t0, steps, part.v0);  // before d_right overwrites it
        gather_key_sums<SPLIT>(part, M, dMh, d_ends, d_hat, Z);
        scale_columns<VALUES>(dS, decay);
        sync_head<SPLIT>();  // and read: from here a block writes its own again
        float* d_right = E;  // the block's KEYS columns
        matmul<row, row>(d_left + k0, LDH, dMh, LDM, right + k0, LDH, L2, KEYS, L2, false);  // dM right
        matmul<col, row>(d_right + k0, LDH, dMh, LDM, left + k0, LDH, L2, KEYS, L2, false);  // dM^T left
        matmul<col, row>(dS, LDH, gdy, LDH, hat, LDH, VALUES, N, L2, true);                  // dS += [g; dy]^T hat
        __syncthreads();
        // The input gradients of the block's key channels, one (step, channel) per thread; each factor
        // x e^(phi) adds g x to phi's gradient. The factors are taken as the bf16 tiles the products
        // used, so terms that cancel exactly (a step with nothing before it) cancel here too instead of
        // leaving bf16 rounding. Each thread takes K_PER consecutive steps of one channel, the last
        // first, so a step's e^(c_ex) is the next one's e^(c), and it sums dlw_s = sum_{t>=s} dc_t +
        // sum_{t>s} dc_ex[t] + dc_L over its own steps as it goes (in registers). What the channel's
        // other threads need of it, the sum of dc_t + dc_ex over its steps and of their terms of dc_L,
        // it leaves in two of its own (step, channel) places in d_right, which nobody else reads here;
        // after the barrier each thread adds the later steps' sums and dc_L and writes its dlw. da and dr
        // go into xv's rows, db and dk into gdy's (both free now), and out in pieces after the barrier.
        {
            bf16 *da_dr = xv, *db_dk = gdy;
            constexpr int K_GROUPS = THREADS / KEYS, K_PER = L / K_GROUPS;  // threads per channel, steps per thread
            static_assert(THREADS % KEYS == 0 && L % K_GROUPS == 0 && K_PER >= 2, "whole steps of one channel per thread");
            const int n = k0 + tid % KEYS, group = tid / KEYS, first = group * K_PER;
            const float c_L = cum[(L - 1) * N + n], c_ref = 0.5f * c_L, up = __expf(c_ref), down = __expf(-c_ref);
            float e_c = __expf(cum[(first + K_PER - 1) * N + n]);
            float suffix[K_PER];     // sum over this thread's steps u >= t of dc_t[u] and u > t of dc_ex[u]
            float run = 0.f, dc_L = 0.f;  // this thread's dc_t + dc_ex, and its terms of dc_L
#pragma unroll
            for (int j = K_PER - 1; j >= 0; j--) {
                const int t = first + j;
                const float c = cum[t * N + n], e_b = __expf(c_ref - c), e_end = e_b * up;
                const float e_ex = __expf(t > 0 ? cum[(t - 1) * N + n] : 0.f);
                const float gl_a = d_left[t * LDH + n], gl_r = d_left[(L + t) * LDH + n];
                const float gr_b = d_right[t * LDH + n], gr_k = d_right[(L + t) * LDH + n];
                const float ge_b = d_ends[t * LDH + n], ge_k = d_ends[(L + t) * LDH + n];
                const float gh_a = d_hat[t * LDH + n], gh_r = d_hat[(L + t) * LDH + n];
                da_dr[t * LDH + n] = to_bf16(gl_a * (e_ex * down) + gh_a * e_ex);
                da_dr[(L + t) * LDH + n] = to_bf16(gl_r * (e_c * down) + gh_r * e_c);
                db_dk[t * LDH + n] = to_bf16(gr_b * e_b + ge_b * e_end);
                db_dk[(L + t) * LDH + n] = to_bf16(gr_k * e_b + ge_k * e_end);
                const float t_la = gl_a * f32(left[t * LDH + n]), t_lr = gl_r * f32(left[(L + t) * LDH + n]);
                const float t_rb = gr_b * f32(right[t * LDH + n]), t_rk = gr_k * f32(right[(L + t) * LDH + n]);
                const float t_end = ge_b * f32(ends[t * LDH + n]) + ge_k * f32(ends[(L + t) * LDH + n]);
                const float t_ha = gh_a * f32(hat[t * LDH + n]), t_hr = gh_r * f32(hat[(L + t) * LDH + n]);
                run += t_lr + t_hr - t_rb - t_rk - t_end;  // dc_t
                suffix[j] = run;
                run += t_la + t_ha;  // dc_ex[t]
                dc_L += t_end;
                e_c = e_ex;
            }
            d_right[first * LDH + n] = run, d_right[(first + 1) * LDH + n] = dc_L;
            __syncthreads();
            const unsigned floored = clamped_steps(clamped, n);
            write_dlw<K_GROUPS, K_PER>(d_right, Z, decay, n, group, suffix, floored, steps, out.dlw, g, t0);
            using Out = Pieces<bf16, KEYS>;
            Out::write(da_dr + k0, LDH, out.da, g, t0, steps, k0);
            Out::write(da_dr + L * LDH + k0, LDH, out.dr, g, t0, steps, k0);
            Out::write(db_dk + k0, LDH, out.db, g, t0, steps, k0);
            Out::write(db_dk + L * LDH + k0, LDH, out.dk, g, t0, steps, k0);
        }
        round_state<VALUES>(dS, dSh);
        // No barrier before the next chunk's staging: what it writes was last read before the barrier
        // above, except xv (da, dr) and rows L.. of gdy (dk) until they are written out. There a piece of
        // sa, v or dy goes where the same thread read its piece of da, dr or dk (the same pieces of the
        // same rows; with split heads, columns k0 .. of a block with k0 > 0 are never staged into).
        static_assert(KEYS == VALUES, "da, dr, dk and the next chunk's sa, v, dy in the same pieces");
    }
    store_state<VALUES>(dS, ds0 + head * N * N + rows);
}

// Launches, shared by the torch binding below and the CPU emulation in tests/cuda_cpu. split: the
// blocks per head (above 1 needs clusters, so sm_90 or later); false, launching nothing, for a split
// that is not valid_split.
inline bool launch_forward(cudaStream_t stream, int split, int B, int T, int H, Inputs in, const float* s0, bf16* y,
                           float* s_final, bf16* states, bf16* sa) {
    return with_split(split, [&](auto s) {
        constexpr int SPLIT = decltype(s)::value;
        constexpr ForwardSmem F;
        launch_heads<SPLIT>(forward_kernel<SPLIT>, F.bytes, false, stream, B, H, T, H, in, s0, y, s_final, states, sa);
    });
}

inline bool launch_backward(cudaStream_t stream, int split, int B, int T, int H, Inputs in, const bf16* dy,
                            Saved saved, const float* ds_final, Grads out, float* ds0) {
    return with_split(split, [&](auto s) {
        constexpr int SPLIT = decltype(s)::value;
        constexpr BackwardSmem S;
        launch_heads<SPLIT>(backward_kernel<SPLIT>, S.bytes, true, stream, B, H, T, H, in, dy, saved, ds_final, out,
                            ds0);
    });
}

}  // namespace wkv7c

#ifndef WKV_KERNELS_ONLY
// ---------------------------------------------------------------------------------------------
// Host side. Python allocates every output (so tests can poison them) and checks shapes; here we
// check what would make the kernels read or write out of bounds.
namespace {

using torch::Tensor;
using wkv7c::bf16;

// Every tensor is read and written 16 bytes at a time, so each must start 16-byte aligned.
void check(const Tensor& x, const char* name, at::ScalarType dtype, int64_t numel) {
    wkv_binding::check_aligned("wkv7_chunked", x, name, dtype, numel);
}

const bf16* cbf(const Tensor& x) { return wkv_binding::bf16_in(x); }
bf16* mbf(const Tensor& x) { return wkv_binding::bf16_out(x); }

wkv7c::Inputs inputs(const Tensor& r, const Tensor& lw, const Tensor& k, const Tensor& v, const Tensor& a,
                     const Tensor& b) {
    return wkv7c::Inputs{cbf(r), cbf(k), cbf(v), cbf(a), cbf(b), lw.data_ptr<float>()};
}

void check_inputs(const Tensor& r, const Tensor& lw, const Tensor& k, const Tensor& v, const Tensor& a,
                  const Tensor& b, const Tensor& states, const Tensor& sa) {
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkv7c::N, "wkv7_chunked: inputs must be [B, T, H, ", wkv7c::N, "]");
    const int64_t n = r.numel(), chunks = (r.size(1) + wkv7c::L - 1) / wkv7c::L;
    for (auto [x, name] : {std::pair{r, "r"}, {k, "k"}, {v, "v"}, {a, "a"}, {b, "b"}, {sa, "sa"}})
        check(x, name, at::kBFloat16, n);
    check(lw, "lw", at::kFloat, n);
    check(states, "states", at::kBFloat16, r.size(0) * r.size(2) * chunks * wkv7c::N * wkv7c::N);
}

void check_split(int64_t split, const Tensor& on) {
    wkv_binding::check_split("wkv7_chunked", split, wkv7c::valid_split(int(split)), wkv7c::N, on);
}

void forward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s0, Tensor y, Tensor s_final,
             Tensor states, Tensor sa, int64_t split) {
    check_inputs(r, lw, k, v, a, b, states, sa);
    check_split(split, r);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t ns = int64_t(B) * H * wkv7c::N * wkv7c::N;
    check(y, "y", at::kBFloat16, r.numel());
    check(s0, "s0", at::kFloat, ns);
    check(s_final, "s_final", at::kFloat, ns);
    if (B == 0 || H == 0) return;
    wkv7c::launch_forward(c10::cuda::getCurrentCUDAStream(), int(split), B, T, H, inputs(r, lw, k, v, a, b),
                          s0.data_ptr<float>(), mbf(y), s_final.data_ptr<float>(), mbf(states), mbf(sa));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor a, Tensor b, Tensor states, Tensor sa, Tensor dy,
              Tensor ds_final, Tensor dr, Tensor dlw, Tensor dk, Tensor dv, Tensor da, Tensor db, Tensor ds0,
              int64_t split) {
    check_inputs(r, lw, k, v, a, b, states, sa);
    check_split(split, r);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t n = r.numel(), ns = int64_t(B) * H * wkv7c::N * wkv7c::N;
    for (auto [x, name] : {std::pair{dy, "dy"}, {dr, "dr"}, {dk, "dk"}, {dv, "dv"}, {da, "da"}, {db, "db"}})
        check(x, name, at::kBFloat16, n);
    check(dlw, "dlw", at::kFloat, n);
    check(ds_final, "ds_final", at::kFloat, ns);
    check(ds0, "ds0", at::kFloat, ns);
    if (B == 0 || H == 0) return;
    const wkv7c::Grads out{mbf(dr), mbf(dk), mbf(dv), mbf(da), mbf(db), dlw.data_ptr<float>()};
    wkv7c::launch_backward(c10::cuda::getCurrentCUDAStream(), int(split), B, T, H, inputs(r, lw, k, v, a, b), cbf(dy),
                           wkv7c::Saved{cbf(states), cbf(sa)}, ds_final.data_ptr<float>(), out,
                           ds0.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.attr("head_size") = wkv7c::N;
    m.attr("chunk_len") = wkv7c::L;
    m.attr("log_decay_min") = wkv7c::LW_MIN;
    m.attr("splits") = wkv_binding::splits(wkv7c::valid_split);  // blocks a head's value rows may go to
    m.attr("saved") = std::vector<std::string>{"states", "sa"};  // what the forward writes for the backward
    m.def("forward", &forward,
          "chunked WKV-7 forward: writes y, the final state, every chunk's start state and sa (bf16); "
          "split: blocks per head");
    m.def("backward", &backward, "chunked WKV-7 backward: writes dr, dlw, dk, dv, da, db, ds0; split: blocks per head");
}
#endif  // WKV_KERNELS_ONLY
