// RWKV-5 / RWKV-6 WKV (diagonal decay): forward and backward in bf16 with float32 state and
// accumulation, state in and out. RWKV-5 is the case of one log-decay per channel for every step
// (its decay stream has step and batch strides 0).
//
// Per (batch, head), state S[j][i] (j: key channel, i: value channel), w_t = exp(lw_t), bonus u:
//     y_t[i] = sum_j r_t[j] (S_{t-1}[j][i] + u[j] k_t[j] v_t[i])
//     S_t    = diag(w_t) S_{t-1} + k_t^T v_t
// Backward, with G_t = dL/dS_t (G_{T-1} = dS_T) and drs/dks the parts of dr/dk through the state:
//     G_{t-1} = diag(w_t) G_t + r_t^T dy_t
//     drs_t[j] = sum_i dy_t[i] S_{t-1}[j][i]      dr_t = drs_t + u k_t (dy_t . v_t)
//     dks_t[j] = sum_i G_t[j][i] v_t[i]           dk_t = dks_t + u r_t (dy_t . v_t)
//     dv_t[i]  = sum_j G_t[j][i] k_t[j] + dy_t[i] sum_j r_t[j] u[j] k_t[j]
//     du      += r_t k_t (dy_t . v_t)            dS_0 = G_{-1}
// and the log-decay gradient dlw_t = w_t sum_i G_t S_{t-1} without holding S and G at once: with
// Z_t = sum_i G_t[j][i] S_t[j][i],
//     dlw_t = Z_t - k_t dks_t,     Z_{t-1} = dlw_t + r_t drs_t,     Z_{T-1} = sum_i dS_T S_T.
//
// Four passes, none of which needs a reduction across the lines of the state:
//   forward      columns of S (value channel i)          y, final state
//   back_state   rows of S (key channel j), forward       dr, r drs
//   back_decay   rows of G, reverse                       dk, dlw, du, dS_0
//   back_value   columns of G, reverse                    dv
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "wkv_common.cuh"

namespace wkv {

// ---------------------------------------------------------------------------------------------
// forward: line = value channel i; segment over key channels j (S[j][i] for j in the segment).
constexpr int FWD_IN = 5, FWD_OUT = 1, FWD_CT = chunk_steps(FWD_IN + FWD_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) forward_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    const float* __restrict__ u, const float* __restrict__ s0, Stream<bf16> y, float* __restrict__ s_final) {
    constexpr int CT = FWD_CT;
    __shared__ __align__(16) float sh[(FWD_IN + FWD_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *suk = sk + CT * ROW, *sv = suk + CT * ROW,
          *oy = sv + CT * ROW;
    const int h = blockIdx.x, b = blockIdx.y, line = threadIdx.x / SPLIT, q = threadIdx.x % SPLIT;
    const int64_t mat = (int64_t(b) * H + h) * N * N;
    const TimesConst times_u{u + h * N};

    float S[SEG];
    load_col(s0 + mat, line, q, S);
    Fetch<CT, bf16> f0; Fetch<CT, float> f1; Fetch<CT, bf16> f2; Fetch<CT, bf16> f3; Fetch<CT, bf16> f4;
    auto fetch = [&](int t) { f0.get(r, b, h, t, T); f1.get(lw, b, h, t, T); f2.get(k, b, h, t, T); f3.get(k, b, h, t, T); f4.get(v, b, h, t, T); };
    fetch(0);
    for (int t0 = 0; t0 < T; t0 += CT) {
        __syncthreads();
        f0.put(sr); f1.put(sw, Exp()); f2.put(sk); f3.put(suk, times_u); f4.put(sv);
        __syncthreads();
        if (t0 + CT < T) fetch(t0 + CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = 0; s < steps; s++) {
            const int o = s * ROW;
            const float vi = sv[o + padded(line)];
            float x[SEG], z[SEG];
            load_segment(suk + o, q, x);
#pragma unroll
            for (int e = 0; e < SEG; e++) x[e] = fmaf(x[e], vi, S[e]);  // S_{t-1} + u k v
            load_segment(sr + o, q, z);
            const float yi = line_sum(dot(x, z));
            load_segment(sw + o, q, x);
            load_segment(sk + o, q, z);
#pragma unroll
            for (int e = 0; e < SEG; e++) S[e] = fmaf(S[e], x[e], z[e] * vi);
            if (q == 0) oy[o + padded(line)] = yi;
        }
        __syncthreads();
        unstage<CT>(oy, y, b, h, t0, T);
    }
    store_col(s_final + mat, line, q, S);
}

// ---------------------------------------------------------------------------------------------
// back_state: line = key channel j (a row of S), forward in time. Gives dr and r drs.
constexpr int ST_IN = 6, ST_OUT = 2, ST_CT = chunk_steps(ST_IN + ST_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_state_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    const float* __restrict__ u, Stream<const bf16> dy, const float* __restrict__ s0, Stream<bf16> dr,
    Stream<float> rdrs) {
    constexpr int CT = ST_CT;
    __shared__ __align__(16) float sh[(ST_IN + ST_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *suk = sk + CT * ROW, *sv = suk + CT * ROW,
          *sdy = sv + CT * ROW, *odr = sdy + CT * ROW, *ordrs = odr + CT * ROW;
    const int h = blockIdx.x, b = blockIdx.y, line = threadIdx.x / SPLIT, q = threadIdx.x % SPLIT;
    const int64_t mat = (int64_t(b) * H + h) * N * N;
    const int pj = padded(line);
    const TimesConst times_u{u + h * N};

    float S[SEG];
    load_row(s0 + mat, line, q, S);
    Fetch<CT, bf16> f0; Fetch<CT, float> f1; Fetch<CT, bf16> f2; Fetch<CT, bf16> f3; Fetch<CT, bf16> f4; Fetch<CT, bf16> f5;
    auto fetch = [&](int t) { f0.get(r, b, h, t, T); f1.get(lw, b, h, t, T); f2.get(k, b, h, t, T); f3.get(k, b, h, t, T); f4.get(v, b, h, t, T); f5.get(dy, b, h, t, T); };
    fetch(0);
    for (int t0 = 0; t0 < T; t0 += CT) {
        __syncthreads();
        f0.put(sr); f1.put(sw, Exp()); f2.put(sk); f3.put(suk, times_u); f4.put(sv); f5.put(sdy);
        __syncthreads();
        if (t0 + CT < T) fetch(t0 + CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = 0; s < steps; s++) {
            const int o = s * ROW;
            float x[SEG], z[SEG];
            load_segment(sdy + o, q, x);
            load_segment(sv + o, q, z);
            float drs = dot(S, x), dyv = dot(z, x);
            drs = line_sum(drs);
            dyv = line_sum(dyv);
            if (q == 0) {
                odr[o + pj] = fmaf(suk[o + pj], dyv, drs);
                ordrs[o + pj] = sr[o + pj] * drs;
            }
            const float wj = sw[o + pj], kj = sk[o + pj];
#pragma unroll
            for (int e = 0; e < SEG; e++) S[e] = fmaf(S[e], wj, kj * z[e]);
        }
        __syncthreads();
        unstage<CT>(odr, dr, b, h, t0, T);
        unstage<CT>(ordrs, rdrs, b, h, t0, T);
    }
}

// ---------------------------------------------------------------------------------------------
// back_decay: line = key channel j (a row of G), reverse in time. Gives dk, dlw, du and dS_0.
constexpr int DEC_IN = 6, DEC_OUT = 2, DEC_CT = chunk_steps(DEC_IN + DEC_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_decay_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    const float* __restrict__ u, Stream<const bf16> dy, Stream<const float> rdrs, const float* __restrict__ s_final,
    const float* __restrict__ ds_final, Stream<bf16> dk, Stream<float> dlw, float* __restrict__ du_part,
    float* __restrict__ ds0) {
    constexpr int CT = DEC_CT;
    __shared__ __align__(16) float sh[(DEC_IN + DEC_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *sv = sk + CT * ROW, *sdy = sv + CT * ROW,
          *srd = sdy + CT * ROW, *odk = srd + CT * ROW, *odlw = odk + CT * ROW;
    const int h = blockIdx.x, b = blockIdx.y, line = threadIdx.x / SPLIT, q = threadIdx.x % SPLIT;
    const int64_t mat = (int64_t(b) * H + h) * N * N;
    const int pj = padded(line);
    const float uj = u[h * N + line];

    float G[SEG], x[SEG], z[SEG];
    load_row(ds_final + mat, line, q, G);
    load_row(s_final + mat, line, q, z);
    float Z = line_sum(dot(G, z));
    float du = 0.f;
    Fetch<CT, bf16> f0; Fetch<CT, float> f1; Fetch<CT, bf16> f2; Fetch<CT, bf16> f3; Fetch<CT, bf16> f4; Fetch<CT, float> f5;
    auto fetch = [&](int t) { f0.get(r, b, h, t, T); f1.get(lw, b, h, t, T); f2.get(k, b, h, t, T); f3.get(v, b, h, t, T); f4.get(dy, b, h, t, T); f5.get(rdrs, b, h, t, T); };
    fetch((T - 1) / CT * CT);
    for (int t0 = (T - 1) / CT * CT; t0 >= 0; t0 -= CT) {
        __syncthreads();
        f0.put(sr); f1.put(sw, Exp()); f2.put(sk); f3.put(sv); f4.put(sdy); f5.put(srd);
        __syncthreads();
        if (t0 - CT >= 0) fetch(t0 - CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = steps - 1; s >= 0; s--) {
            const int o = s * ROW;
            load_segment(sv + o, q, x);
            load_segment(sdy + o, q, z);
            float dks = dot(G, x), dyv = dot(z, x);
            dks = line_sum(dks);
            dyv = line_sum(dyv);
            const float rj = sr[o + pj], kj = sk[o + pj];
            const float gl = Z - kj * dks;
            if (q == 0) {
                odk[o + pj] = fmaf(uj * rj, dyv, dks);
                odlw[o + pj] = gl;
            }
            du = fmaf(rj * kj, dyv, du);
            Z = gl + srd[o + pj];
            const float wj = sw[o + pj];
#pragma unroll
            for (int e = 0; e < SEG; e++) G[e] = fmaf(G[e], wj, rj * z[e]);  // G_{t-1}
        }
        __syncthreads();
        unstage<CT>(odk, dk, b, h, t0, T);
        unstage<CT>(odlw, dlw, b, h, t0, T);
    }
    store_row(ds0 + mat, line, q, G);
    if (q == 0) du_part[(int64_t(b) * H + h) * N + line] = du;
}

// ---------------------------------------------------------------------------------------------
// back_value: line = value channel i (a column of G), reverse in time. Gives dv.
constexpr int VAL_IN = 5, VAL_OUT = 1, VAL_CT = chunk_steps(VAL_IN + VAL_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_value_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, const float* __restrict__ u,
    Stream<const bf16> dy, const float* __restrict__ ds_final, Stream<bf16> dv) {
    constexpr int CT = VAL_CT;
    __shared__ __align__(16) float sh[(VAL_IN + VAL_OUT) * CT * ROW];
    float *sr = sh, *sru = sr + CT * ROW, *sw = sru + CT * ROW, *sk = sw + CT * ROW, *sdy = sk + CT * ROW,
          *odv = sdy + CT * ROW;
    const int h = blockIdx.x, b = blockIdx.y, line = threadIdx.x / SPLIT, q = threadIdx.x % SPLIT;
    const int64_t mat = (int64_t(b) * H + h) * N * N;
    const TimesConst times_u{u + h * N};

    float G[SEG];
    load_col(ds_final + mat, line, q, G);
    Fetch<CT, bf16> f0; Fetch<CT, bf16> f1; Fetch<CT, float> f2; Fetch<CT, bf16> f3; Fetch<CT, bf16> f4;
    auto fetch = [&](int t) { f0.get(r, b, h, t, T); f1.get(r, b, h, t, T); f2.get(lw, b, h, t, T); f3.get(k, b, h, t, T); f4.get(dy, b, h, t, T); };
    fetch((T - 1) / CT * CT);
    for (int t0 = (T - 1) / CT * CT; t0 >= 0; t0 -= CT) {
        __syncthreads();
        f0.put(sr); f1.put(sru, times_u); f2.put(sw, Exp()); f3.put(sk); f4.put(sdy);
        __syncthreads();
        if (t0 - CT >= 0) fetch(t0 - CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = steps - 1; s >= 0; s--) {
            const int o = s * ROW;
            const float dyi = sdy[o + padded(line)];
            float x[SEG], z[SEG];
            load_segment(sru + o, q, x);
#pragma unroll
            for (int e = 0; e < SEG; e++) x[e] = fmaf(dyi, x[e], G[e]);  // G_t + dy_i r u
            load_segment(sk + o, q, z);
            const float dvi = line_sum(dot(x, z));
            if (q == 0) odv[o + padded(line)] = dvi;
            load_segment(sw + o, q, x);
            load_segment(sr + o, q, z);
#pragma unroll
            for (int e = 0; e < SEG; e++) G[e] = fmaf(G[e], x[e], z[e] * dyi);  // G_{t-1}
        }
        __syncthreads();
        unstage<CT>(odv, dv, b, h, t0, T);
    }
}

}  // namespace wkv

// ---------------------------------------------------------------------------------------------
// Host side. Python allocates every output (so tests can poison them); here we check what would
// make the kernels read or write out of bounds. lw is [B, T, H, N] (RWKV-6) or [H, N] (RWKV-5).
namespace {

using torch::Tensor;
using cbf = const wkv::bf16;

void check(const Tensor& x, const char* name, at::ScalarType dtype, int64_t numel) {
    TORCH_CHECK(x.is_cuda(), "wkv_diag: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == dtype, "wkv_diag: ", name, " has dtype ", x.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(x.is_contiguous(), "wkv_diag: ", name, " must be contiguous");
    TORCH_CHECK(x.numel() == numel, "wkv_diag: ", name, " has ", x.numel(), " elements, expected ", numel);
}

template <typename T>
wkv::Stream<T> seq(const Tensor& x, int T_, int H) {
    return wkv::stream(reinterpret_cast<T*>(x.data_ptr()), T_, H);
}

// The decay stream: per step (RWKV-6) or one vector per head for every step (RWKV-5).
wkv::Stream<const float> decay(const Tensor& lw, int B, int T, int H) {
    const int64_t per_step = int64_t(B) * T * H * wkv::N, per_head = int64_t(H) * wkv::N;
    TORCH_CHECK(lw.is_cuda() && lw.scalar_type() == at::kFloat && lw.is_contiguous(),
                "wkv_diag: lw must be a contiguous float32 CUDA tensor");
    TORCH_CHECK(lw.numel() == per_step || lw.numel() == per_head, "wkv_diag: lw must be [B, T, H, N] or [H, N]");
    if (lw.numel() == per_step && per_step != per_head) return seq<const float>(lw, T, H);
    return wkv::Stream<const float>{lw.data_ptr<float>(), 0, 0};
}

void forward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor u, Tensor s0, Tensor y, Tensor s_final) {
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkv::N, "wkv_diag: inputs must be [B, T, H, ", wkv::N, "]");
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t n = r.numel(), ns = int64_t(B) * H * wkv::N * wkv::N;
    for (auto [x, name] : {std::pair{r, "r"}, {k, "k"}, {v, "v"}, {y, "y"}}) check(x, name, at::kBFloat16, n);
    check(u, "u", at::kFloat, int64_t(H) * wkv::N);
    check(s0, "s0", at::kFloat, ns);
    check(s_final, "s_final", at::kFloat, ns);
    const auto w = decay(lw, B, T, H);
    if (T == 0 || B == 0 || H == 0) return;
    wkv::forward_kernel<<<dim3(H, B), wkv::THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        T, H, seq<cbf>(r, T, H), w, seq<cbf>(k, T, H), seq<cbf>(v, T, H), u.data_ptr<float>(), s0.data_ptr<float>(),
        seq<wkv::bf16>(y, T, H), s_final.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dlw comes back per step [B, T, H, N] (RWKV-5 sums it over B and T), du per batch [B, H, N].
void backward(Tensor r, Tensor lw, Tensor k, Tensor v, Tensor u, Tensor s0, Tensor s_final, Tensor dy,
              Tensor ds_final, Tensor dr, Tensor dlw, Tensor dk, Tensor dv, Tensor du_part, Tensor ds0, Tensor rdrs) {
    TORCH_CHECK(r.dim() == 4 && r.size(3) == wkv::N, "wkv_diag: inputs must be [B, T, H, ", wkv::N, "]");
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t n = r.numel(), ns = int64_t(B) * H * wkv::N * wkv::N;
    for (auto [x, name] : {std::pair{r, "r"}, {k, "k"}, {v, "v"}, {dy, "dy"}, {dr, "dr"}, {dk, "dk"}, {dv, "dv"}})
        check(x, name, at::kBFloat16, n);
    check(dlw, "dlw", at::kFloat, n);
    check(rdrs, "rdrs", at::kFloat, n);
    check(u, "u", at::kFloat, int64_t(H) * wkv::N);
    check(du_part, "du_part", at::kFloat, int64_t(B) * H * wkv::N);
    for (auto [x, name] : {std::pair{s0, "s0"}, {s_final, "s_final"}, {ds_final, "ds_final"}, {ds0, "ds0"}})
        check(x, name, at::kFloat, ns);
    const auto w = decay(lw, B, T, H);
    if (B == 0 || H == 0) return;
    if (T == 0) {
        ds0.copy_(ds_final);
        du_part.zero_();
        return;
    }
    auto stream = c10::cuda::getCurrentCUDAStream();
    const dim3 grid(H, B);
    const float* up = u.data_ptr<float>();
    wkv::back_state_kernel<<<grid, wkv::THREADS, 0, stream>>>(T, H, seq<cbf>(r, T, H), w, seq<cbf>(k, T, H),
                                                              seq<cbf>(v, T, H), up, seq<cbf>(dy, T, H),
                                                              s0.data_ptr<float>(), seq<wkv::bf16>(dr, T, H),
                                                              seq<float>(rdrs, T, H));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    wkv::back_value_kernel<<<grid, wkv::THREADS, 0, stream>>>(T, H, seq<cbf>(r, T, H), w, seq<cbf>(k, T, H), up,
                                                              seq<cbf>(dy, T, H), ds_final.data_ptr<float>(),
                                                              seq<wkv::bf16>(dv, T, H));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    wkv::back_decay_kernel<<<grid, wkv::THREADS, 0, stream>>>(
        T, H, seq<cbf>(r, T, H), w, seq<cbf>(k, T, H), seq<cbf>(v, T, H), up, seq<cbf>(dy, T, H),
        seq<const float>(rdrs, T, H), s_final.data_ptr<float>(), ds_final.data_ptr<float>(), seq<wkv::bf16>(dk, T, H),
        seq<float>(dlw, T, H), du_part.data_ptr<float>(), ds0.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.attr("head_size") = wkv::N;
    m.def("forward", &forward, "WKV-5/6 forward: writes y and the final state");
    m.def("backward", &backward, "WKV-5/6 backward: writes dr, dlw (per step), dk, dv, du (per batch), ds0");
}
