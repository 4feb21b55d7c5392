// RWKV-7 WKV: forward and backward in bf16 with float32 state and accumulation, state in and out.
//
// Per (batch, head), state S[i][j] (i: value channel, j: key channel), w_t = exp(lw_t):
//     sa_t = S_{t-1} a_t
//     S_t  = S_{t-1} diag(w_t) + sa_t b_t^T + v_t k_t^T
//     y_t  = S_t r_t
// Backward, with G_t = dL/dS_t (G_{T-1} = dS_T + dy_{T-1} r_{T-1}^T):
//     G_{t-1} = G_t diag(w_t) + dsa_t a_t^T + dy_{t-1} r_{t-1}^T,   dsa_t = G_t b_t
//     dv_t = G_t k_t      dk_t = G_t^T v_t      db_t = G_t^T sa_t
//     dr_t = S_t^T dy_t   da_t = S_{t-1}^T dsa_t
//     dS_0 = G_0 diag(w_0) + dsa_0 a_0^T
// and the log-decay gradient without holding S and G at once: with Z_t = sum_i G_t[i][j] S_t[i][j],
//     dlw_t = Z_t - b_t db_t - k_t dk_t,     Z_{t-1} = dlw_t + a_t da_t + r_{t-1} dr_{t-1}
// (elementwise over j), which starts from Z_{T-1} = sum_i G_{T-1} * S_T and runs backwards.
//
// Four passes, none of which needs a reduction across the lines of the state:
//   forward   rows of S      (y, sa, final state)
//   back_rows rows of G, reverse   (dv, dsa, dS_0)
//   back_cols columns of S, forward (dr, da, x_t = a_t da_t + r_{t-1} dr_{t-1})
//   back_decay columns of G, reverse (dk, db, dlw)
// The decay can be any value in (0, 1]: nothing is divided by it.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "wkv_common.cuh"

namespace wkv {

// ---------------------------------------------------------------------------------------------
// forward: line = row i of S (value channel), segment over key channels j.
constexpr int FWD_IN = 6, FWD_OUT = 2, FWD_CT = chunk_steps(FWD_IN + FWD_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) forward_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    Stream<const bf16> a, Stream<const bf16> bb, const float* __restrict__ s0, Stream<bf16> y, Stream<float> sa_out,
    float* __restrict__ s_final) {
    constexpr int CT = FWD_CT;
    __shared__ __align__(16) float sh[(FWD_IN + FWD_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *sv = sk + CT * ROW, *sa_ = sv + CT * ROW,
          *sb = sa_ + CT * ROW, *oy = sb + CT * ROW, *osa = oy + CT * ROW;
    const int h = blockIdx.x, b = blockIdx.y, line = threadIdx.x / SPLIT, q = threadIdx.x % SPLIT;
    const int64_t mat = (int64_t(b) * H + h) * N * N;

    float S[SEG];
    load_row(s0 + mat, line, q, S);
    Fetch<CT, bf16> f0; Fetch<CT, float> f1; Fetch<CT, bf16> f2; Fetch<CT, bf16> f3; Fetch<CT, bf16> f4; Fetch<CT, bf16> f5;
    auto fetch = [&](int t) { f0.get(r, b, h, t, T); f1.get(lw, b, h, t, T); f2.get(k, b, h, t, T); f3.get(v, b, h, t, T); f4.get(a, b, h, t, T); f5.get(bb, b, h, t, T); };
    fetch(0);
    for (int t0 = 0; t0 < T; t0 += CT) {
        __syncthreads();
        f0.put(sr); f1.put(sw, Exp()); f2.put(sk); f3.put(sv); f4.put(sa_); f5.put(sb);
        __syncthreads();
        if (t0 + CT < T) fetch(t0 + CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = 0; s < steps; s++) {
            float x[SEG], w[SEG];
            load_segment(sa_ + s * ROW, q, x);
            const float sa = line_sum(dot(S, x));
            const float vi = sv[s * ROW + padded(line)];
            load_segment(sw + s * ROW, q, w);
            load_segment(sb + s * ROW, q, x);
#pragma unroll
            for (int e = 0; e < SEG; e++) S[e] = fmaf(S[e], w[e], sa * x[e]);
            load_segment(sk + s * ROW, q, x);
#pragma unroll
            for (int e = 0; e < SEG; e++) S[e] = fmaf(vi, x[e], S[e]);
            load_segment(sr + s * ROW, q, x);
            const float yi = line_sum(dot(S, x));
            if (q == 0) {
                oy[s * ROW + padded(line)] = yi;
                osa[s * ROW + padded(line)] = sa;
            }
        }
        __syncthreads();
        unstage<CT>(oy, y, b, h, t0, T);
        unstage<CT>(osa, sa_out, b, h, t0, T);
    }
    store_row(s_final + mat, line, q, S);
}

// ---------------------------------------------------------------------------------------------
// back_rows: line = row i of G, reverse in time. Gives dv, dsa and dS_0.
constexpr int ROWS_IN = 6, ROWS_OUT = 2, ROWS_CT = chunk_steps(ROWS_IN + ROWS_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_rows_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> a,
    Stream<const bf16> bb, Stream<const bf16> dy, const float* __restrict__ ds_final, Stream<bf16> dv,
    Stream<float> dsa_out, float* __restrict__ ds0) {
    constexpr int CT = ROWS_CT;
    __shared__ __align__(16) float sh[(ROWS_IN + ROWS_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *sa_ = sk + CT * ROW, *sb = sa_ + CT * ROW,
          *sdy = sb + CT * ROW, *odv = sdy + CT * ROW, *odsa = odv + CT * ROW;
    const int h = blockIdx.x, b = blockIdx.y, line = threadIdx.x / SPLIT, q = threadIdx.x % SPLIT;
    const int64_t mat = (int64_t(b) * H + h) * N * N;

    float G[SEG];
    load_row(ds_final + mat, line, q, G);
    Fetch<CT, bf16> f0; Fetch<CT, float> f1; Fetch<CT, bf16> f2; Fetch<CT, bf16> f3; Fetch<CT, bf16> f4; Fetch<CT, bf16> f5;
    auto fetch = [&](int t) { f0.get(r, b, h, t, T); f1.get(lw, b, h, t, T); f2.get(k, b, h, t, T); f3.get(a, b, h, t, T); f4.get(bb, b, h, t, T); f5.get(dy, b, h, t, T); };
    fetch((T - 1) / CT * CT);
    for (int t0 = (T - 1) / CT * CT; t0 >= 0; t0 -= CT) {
        __syncthreads();
        f0.put(sr); f1.put(sw, Exp()); f2.put(sk); f3.put(sa_); f4.put(sb); f5.put(sdy);
        __syncthreads();
        if (t0 - CT >= 0) fetch(t0 - CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = steps - 1; s >= 0; s--) {
            float x[SEG];
            const float dyi = sdy[s * ROW + padded(line)];
            load_segment(sr + s * ROW, q, x);
#pragma unroll
            for (int e = 0; e < SEG; e++) G[e] = fmaf(dyi, x[e], G[e]);  // G_t
            load_segment(sb + s * ROW, q, x);
            float dsa = dot(G, x);
            load_segment(sk + s * ROW, q, x);
            float dvi = dot(G, x);
            dsa = line_sum(dsa);
            dvi = line_sum(dvi);
            if (q == 0) {
                odv[s * ROW + padded(line)] = dvi;
                odsa[s * ROW + padded(line)] = dsa;
            }
            float w[SEG];
            load_segment(sw + s * ROW, q, w);
            load_segment(sa_ + s * ROW, q, x);
#pragma unroll
            for (int e = 0; e < SEG; e++) G[e] = fmaf(G[e], w[e], dsa * x[e]);  // G_t M_t^T
        }
        __syncthreads();
        unstage<CT>(odv, dv, b, h, t0, T);
        unstage<CT>(odsa, dsa_out, b, h, t0, T);
    }
    store_row(ds0 + mat, line, q, G);
}

// ---------------------------------------------------------------------------------------------
// back_cols: line = column j of S, forward in time (S recomputed from S_0). Gives dr, da and
// x_t = a_t da_t + r_{t-1} dr_{t-1} for the decay pass.
constexpr int COLS_IN = 9, COLS_OUT = 3, COLS_CT = chunk_steps(COLS_IN + COLS_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_cols_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    Stream<const bf16> a, Stream<const bf16> bb, Stream<const bf16> dy, Stream<const float> sa_in,
    Stream<const float> dsa_in, const float* __restrict__ s0, Stream<bf16> dr, Stream<bf16> da, Stream<float> x_out) {
    constexpr int CT = COLS_CT;
    __shared__ __align__(16) float sh[(COLS_IN + COLS_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *sv = sk + CT * ROW, *sa_ = sv + CT * ROW,
          *sb = sa_ + CT * ROW, *sdy = sb + CT * ROW, *ssa = sdy + CT * ROW, *sdsa = ssa + CT * ROW,
          *odr = sdsa + CT * ROW, *oda = odr + CT * ROW, *ox = oda + CT * ROW;
    const int h = blockIdx.x, b = blockIdx.y, line = threadIdx.x / SPLIT, q = threadIdx.x % SPLIT;
    const int64_t mat = (int64_t(b) * H + h) * N * N;
    const int pj = padded(line);

    float S[SEG];
    load_col(s0 + mat, line, q, S);
    float prev_rdr = 0.f;  // r_{t-1} dr_{t-1}
    Fetch<CT, bf16> f0; Fetch<CT, float> f1; Fetch<CT, bf16> f2; Fetch<CT, bf16> f3; Fetch<CT, bf16> f4; Fetch<CT, bf16> f5; Fetch<CT, bf16> f6; Fetch<CT, float> f7; Fetch<CT, float> f8;
    auto fetch = [&](int t) { f0.get(r, b, h, t, T); f1.get(lw, b, h, t, T); f2.get(k, b, h, t, T); f3.get(v, b, h, t, T); f4.get(a, b, h, t, T); f5.get(bb, b, h, t, T); f6.get(dy, b, h, t, T); f7.get(sa_in, b, h, t, T); f8.get(dsa_in, b, h, t, T); };
    fetch(0);
    for (int t0 = 0; t0 < T; t0 += CT) {
        __syncthreads();
        f0.put(sr); f1.put(sw, Exp()); f2.put(sk); f3.put(sv); f4.put(sa_); f5.put(sb); f6.put(sdy); f7.put(ssa); f8.put(sdsa);
        __syncthreads();
        if (t0 + CT < T) fetch(t0 + CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = 0; s < steps; s++) {
            const int o = s * ROW;
            float x[SEG], z[SEG];
            load_segment(sdsa + o, q, x);
            const float daj = line_sum(dot(S, x));  // S_{t-1}^T dsa_t
            const float wj = sw[o + pj], bj = sb[o + pj], kj = sk[o + pj];
            load_segment(ssa + o, q, x);
            load_segment(sv + o, q, z);
#pragma unroll
            for (int e = 0; e < SEG; e++) S[e] = fmaf(S[e], wj, fmaf(x[e], bj, z[e] * kj));
            load_segment(sdy + o, q, x);
            const float drj = line_sum(dot(S, x));  // S_t^T dy_t
            if (q == 0) {
                odr[o + pj] = drj;
                oda[o + pj] = daj;
                ox[o + pj] = fmaf(sa_[o + pj], daj, prev_rdr);
            }
            prev_rdr = sr[o + pj] * drj;
        }
        __syncthreads();
        unstage<CT>(odr, dr, b, h, t0, T);
        unstage<CT>(oda, da, b, h, t0, T);
        unstage<CT>(ox, x_out, b, h, t0, T);
    }
}

// ---------------------------------------------------------------------------------------------
// back_decay: line = column j of G, reverse in time. Gives dk, db and dlw.
constexpr int DEC_IN = 10, DEC_OUT = 3, DEC_CT = chunk_steps(DEC_IN + DEC_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_decay_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    Stream<const bf16> a, Stream<const bf16> bb, Stream<const bf16> dy, Stream<const float> sa_in,
    Stream<const float> dsa_in, Stream<const float> x_in, const float* __restrict__ s_final,
    const float* __restrict__ ds_final, Stream<bf16> dk, Stream<bf16> db, Stream<float> dlw) {
    constexpr int CT = DEC_CT;
    __shared__ __align__(16) float sh[(DEC_IN + DEC_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *sv = sk + CT * ROW, *sa_ = sv + CT * ROW,
          *sb = sa_ + CT * ROW, *sdy = sb + CT * ROW, *ssa = sdy + CT * ROW, *sdsa = ssa + CT * ROW,
          *sx = sdsa + CT * ROW, *odk = sx + CT * ROW, *odb = odk + CT * ROW, *odlw = odb + CT * ROW;
    const int h = blockIdx.x, b = blockIdx.y, line = threadIdx.x / SPLIT, q = threadIdx.x % SPLIT;
    const int64_t mat = (int64_t(b) * H + h) * N * N;
    const int pj = padded(line);

    float G[SEG], x[SEG], z[SEG];
    load_col(ds_final + mat, line, q, G);
    // Z_{T-1} = sum_i (dS_T + dy_{T-1} r_{T-1}^T)[i][j] S_T[i][j]
    {
        load_col(s_final + mat, line, q, z);
        const float r_last = __bfloat162float(r.ptr[r.offset(b, h, T - 1) + line]);
        const bf16* dy_last = dy.ptr + dy.offset(b, h, T - 1) + q * SEG;
#pragma unroll
        for (int e = 0; e < SEG; e++) x[e] = fmaf(__bfloat162float(dy_last[e]), r_last, G[e]);
    }
    float Z = line_sum(dot(x, z));
    Fetch<CT, bf16> f0; Fetch<CT, float> f1; Fetch<CT, bf16> f2; Fetch<CT, bf16> f3; Fetch<CT, bf16> f4; Fetch<CT, bf16> f5; Fetch<CT, bf16> f6; Fetch<CT, float> f7; Fetch<CT, float> f8; Fetch<CT, float> f9;
    auto fetch = [&](int t) { f0.get(r, b, h, t, T); f1.get(lw, b, h, t, T); f2.get(k, b, h, t, T); f3.get(v, b, h, t, T); f4.get(a, b, h, t, T); f5.get(bb, b, h, t, T); f6.get(dy, b, h, t, T); f7.get(sa_in, b, h, t, T); f8.get(dsa_in, b, h, t, T); f9.get(x_in, b, h, t, T); };
    fetch((T - 1) / CT * CT);
    for (int t0 = (T - 1) / CT * CT; t0 >= 0; t0 -= CT) {
        __syncthreads();
        f0.put(sr); f1.put(sw, Exp()); f2.put(sk); f3.put(sv); f4.put(sa_); f5.put(sb); f6.put(sdy); f7.put(ssa); f8.put(sdsa); f9.put(sx);
        __syncthreads();
        if (t0 - CT >= 0) fetch(t0 - CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = steps - 1; s >= 0; s--) {
            const int o = s * ROW;
            const float rj = sr[o + pj];
            load_segment(sdy + o, q, x);
#pragma unroll
            for (int e = 0; e < SEG; e++) G[e] = fmaf(x[e], rj, G[e]);  // G_t
            load_segment(sv + o, q, x);
            float dkj = dot(G, x);
            load_segment(ssa + o, q, x);
            float dbj = dot(G, x);
            dkj = line_sum(dkj);
            dbj = line_sum(dbj);
            const float bj = sb[o + pj], kj = sk[o + pj];
            const float gl = Z - bj * dbj - kj * dkj;
            if (q == 0) {
                odk[o + pj] = dkj;
                odb[o + pj] = dbj;
                odlw[o + pj] = gl;
            }
            Z = gl + sx[o + pj];
            const float wj = sw[o + pj], aj = sa_[o + pj];
            load_segment(sdsa + o, q, x);
#pragma unroll
            for (int e = 0; e < SEG; e++) G[e] = fmaf(G[e], wj, x[e] * aj);  // G_t M_t^T
        }
        __syncthreads();
        unstage<CT>(odk, dk, b, h, t0, T);
        unstage<CT>(odb, db, b, h, t0, T);
        unstage<CT>(odlw, dlw, b, h, t0, T);
    }
}

}  // namespace wkv

// ---------------------------------------------------------------------------------------------
// Host side. Python allocates every output (so tests can poison them) and checks shapes; here we
// check what would make the kernels read or write out of bounds.
namespace {

using torch::Tensor;

void check(const Tensor& x, const char* name, at::ScalarType dtype, int64_t numel) {
    TORCH_CHECK(x.is_cuda(), "wkv7: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == dtype, "wkv7: ", name, " has dtype ", x.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
    TORCH_CHECK(x.numel() == numel, "wkv7: ", name, " has ", x.numel(), " elements, expected ", numel);
}

template <typename T>
wkv::Stream<T> seq(const Tensor& x, int T_, int H) {
    return wkv::stream(reinterpret_cast<T*>(x.data_ptr()), T_, H);
}

using cbf = const wkv::bf16;

void forward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s0, Tensor y, Tensor sa,
             Tensor s_final) {
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkv::N, "wkv7: inputs must be [B, T, H, ", wkv::N, "]");
    const int64_t n = r.numel(), ns = int64_t(B) * H * wkv::N * wkv::N;
    for (auto [x, name] : {std::pair{r, "r"}, {k, "k"}, {v, "v"}, {a, "a"}, {b, "b"}, {y, "y"}})
        check(x, name, at::kBFloat16, n);
    check(lw, "lw", at::kFloat, n);
    check(sa, "sa", at::kFloat, n);
    check(s0, "s0", at::kFloat, ns);
    check(s_final, "s_final", at::kFloat, ns);
    if (T == 0 || B == 0 || H == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    wkv::forward_kernel<<<dim3(H, B), wkv::THREADS, 0, stream>>>(
        T, H, seq<cbf>(r, T, H), seq<const float>(lw, T, H), seq<cbf>(k, T, H), seq<cbf>(v, T, H), seq<cbf>(a, T, H),
        seq<cbf>(b, T, H), s0.data_ptr<float>(), seq<wkv::bf16>(y, T, H), seq<float>(sa, T, H), s_final.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s0, Tensor s_final, Tensor sa,
              Tensor dy, Tensor ds_final, Tensor dr, Tensor dlw, Tensor dk, Tensor dv, Tensor da, Tensor db, Tensor ds0,
              Tensor dsa, Tensor x) {
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkv::N, "wkv7: inputs must be [B, T, H, ", wkv::N, "]");
    const int64_t n = r.numel(), ns = int64_t(B) * H * wkv::N * wkv::N;
    for (auto [t, name] : {std::pair{r, "r"}, {k, "k"}, {v, "v"}, {a, "a"}, {b, "b"}, {dy, "dy"}, {dr, "dr"},
                           {dk, "dk"}, {dv, "dv"}, {da, "da"}, {db, "db"}})
        check(t, name, at::kBFloat16, n);
    for (auto [t, name] : {std::pair{lw, "lw"}, {sa, "sa"}, {dlw, "dlw"}, {dsa, "dsa"}, {x, "x"}})
        check(t, name, at::kFloat, n);
    for (auto [t, name] : {std::pair{s0, "s0"}, {s_final, "s_final"}, {ds_final, "ds_final"}, {ds0, "ds0"}})
        check(t, name, at::kFloat, ns);
    if (B == 0 || H == 0) return;
    if (T == 0) {  // nothing happened: the initial state's gradient is the final state's
        ds0.copy_(ds_final);
        return;
    }
    auto stream = c10::cuda::getCurrentCUDAStream();
    const dim3 grid(H, B);
    wkv::back_rows_kernel<<<grid, wkv::THREADS, 0, stream>>>(
        T, H, seq<cbf>(r, T, H), seq<const float>(lw, T, H), seq<cbf>(k, T, H), seq<cbf>(a, T, H), seq<cbf>(b, T, H),
        seq<cbf>(dy, T, H), ds_final.data_ptr<float>(), seq<wkv::bf16>(dv, T, H), seq<float>(dsa, T, H),
        ds0.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    wkv::back_cols_kernel<<<grid, wkv::THREADS, 0, stream>>>(
        T, H, seq<cbf>(r, T, H), seq<const float>(lw, T, H), seq<cbf>(k, T, H), seq<cbf>(v, T, H), seq<cbf>(a, T, H),
        seq<cbf>(b, T, H), seq<cbf>(dy, T, H), seq<const float>(sa, T, H), seq<const float>(dsa, T, H),
        s0.data_ptr<float>(), seq<wkv::bf16>(dr, T, H), seq<wkv::bf16>(da, T, H), seq<float>(x, T, H));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    wkv::back_decay_kernel<<<grid, wkv::THREADS, 0, stream>>>(
        T, H, seq<cbf>(r, T, H), seq<const float>(lw, T, H), seq<cbf>(k, T, H), seq<cbf>(v, T, H), seq<cbf>(a, T, H),
        seq<cbf>(b, T, H), seq<cbf>(dy, T, H), seq<const float>(sa, T, H), seq<const float>(dsa, T, H),
        seq<const float>(x, T, H), s_final.data_ptr<float>(), ds_final.data_ptr<float>(), seq<wkv::bf16>(dk, T, H),
        seq<wkv::bf16>(db, T, H), seq<float>(dlw, T, H));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.attr("head_size") = wkv::N;
    m.def("forward", &forward, "WKV-7 forward: writes y, sa (for the backward) and the final state");
    m.def("backward", &backward, "WKV-7 backward: writes dr, dlw, dk, dv, da, db, ds0 (dsa, x: scratch)");
}
