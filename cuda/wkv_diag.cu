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
#ifndef WKV_KERNELS_ONLY  // defined by `make cuda-check`: compile the kernels alone, fast
#include "wkv_binding.cuh"
#endif

#include "wkv_common.cuh"

namespace wkv {

// ---------------------------------------------------------------------------------------------
// forward: lines = value channels i (columns of S); segment over key channels j.
constexpr int FWD_IN = 5, FWD_OUT = 1, FWD_CT = chunk_steps(FWD_IN + FWD_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) forward_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    const float* __restrict__ u, const float* __restrict__ s0, Stream<bf16> y, float* __restrict__ s_final) {
    constexpr int CT = FWD_CT;
    __shared__ __align__(16) float sh[(FWD_IN + FWD_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *suk = sk + CT * ROW, *sv = suk + CT * ROW,
          *oy = sv + CT * ROW;
    const Place p(H);
    const int b = p.b, h = p.h, q = p.q;
    const TimesConst times_u{u + h * N};

    float S[LINES][SEG];
    UNROLL_LINES load_col(s0 + p.mat, p.line0 + l, q, S[l]);
    Fetch<CT, bf16> f_r, f_k, f_uk, f_v;
    Fetch<CT, float> f_w;
    auto fetch = [&](int t) {
        f_r.get(r, b, h, t, T), f_w.get(lw, b, h, t, T), f_k.get(k, b, h, t, T), f_v.get(v, b, h, t, T);
    };
    fetch(0);
    for (int t0 = 0; t0 < T; t0 += CT) {
        __syncthreads();
        f_r.put(sr), f_w.put(sw, Exp()), f_k.put(sk), f_k.put(suk, times_u), f_v.put(sv);
        __syncthreads();
        if (t0 + CT < T) fetch(t0 + CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = 0; s < steps; s++) {
            const int o = s * ROW;
            float x[SEG], z[SEG], yi[LINES];
            load_segment(suk + o, q, x);
            load_segment(sr + o, q, z);
            UNROLL_LINES {
                const float vi = sv[o + p.pl + l];
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
                UNROLL_SEG acc[e % 4] = fmaf(z[e], fmaf(x[e], vi, S[l][e]), acc[e % 4]);  // r (S_{t-1} + u k v)
                yi[l] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
            }
            UNROLL_LINES yi[l] = line_sum(yi[l]);
            if (q == 0) UNROLL_LINES oy[o + p.pl + l] = yi[l];
            load_segment(sw + o, q, x);
            load_segment(sk + o, q, z);
            UNROLL_LINES {
                const float vi = sv[o + p.pl + l];
                UNROLL_SEG S[l][e] = fmaf(S[l][e], x[e], z[e] * vi);
            }
        }
        __syncthreads();
        unstage<CT>(oy, y, b, h, t0, T);
    }
    UNROLL_LINES store_col(s_final + p.mat, p.line0 + l, q, S[l]);
}

// ---------------------------------------------------------------------------------------------
// back_state: lines = key channels j (rows of S), forward in time. Gives dr and r drs.
constexpr int ST_IN = 6, ST_OUT = 2, ST_CT = chunk_steps(ST_IN + ST_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_state_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    const float* __restrict__ u, Stream<const bf16> dy, const float* __restrict__ s0, Stream<bf16> dr,
    Stream<float> rdrs) {
    constexpr int CT = ST_CT;
    __shared__ __align__(16) float sh[(ST_IN + ST_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *suk = sk + CT * ROW, *sv = suk + CT * ROW,
          *sdy = sv + CT * ROW, *odr = sdy + CT * ROW, *ordrs = odr + CT * ROW;
    const Place p(H);
    const int b = p.b, h = p.h, q = p.q;
    const TimesConst times_u{u + h * N};

    float S[LINES][SEG];
    UNROLL_LINES load_row(s0 + p.mat, p.line0 + l, q, S[l]);
    Fetch<CT, bf16> f_r, f_k, f_v, f_dy;
    Fetch<CT, float> f_w;
    auto fetch = [&](int t) {
        f_r.get(r, b, h, t, T), f_w.get(lw, b, h, t, T), f_k.get(k, b, h, t, T), f_v.get(v, b, h, t, T);
        f_dy.get(dy, b, h, t, T);
    };
    fetch(0);
    for (int t0 = 0; t0 < T; t0 += CT) {
        __syncthreads();
        f_r.put(sr), f_w.put(sw, Exp()), f_k.put(sk), f_k.put(suk, times_u), f_v.put(sv), f_dy.put(sdy);
        __syncthreads();
        if (t0 + CT < T) fetch(t0 + CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = 0; s < steps; s++) {
            const int o = s * ROW;
            float x[SEG], z[SEG], drs[LINES];
            load_segment(sdy + o, q, x);
            load_segment(sv + o, q, z);
            const float dyv = line_sum(dot(z, x));  // dy_t . v_t, the same for every line
            UNROLL_LINES drs[l] = dot(S[l], x);
            UNROLL_LINES drs[l] = line_sum(drs[l]);
            if (q == 0) {
                UNROLL_LINES {
                    const int at = o + p.pl + l;
                    odr[at] = fmaf(suk[at], dyv, drs[l]);
                    ordrs[at] = sr[at] * drs[l];
                }
            }
            UNROLL_LINES {
                const float wj = sw[o + p.pl + l], kj = sk[o + p.pl + l];
                UNROLL_SEG S[l][e] = fmaf(S[l][e], wj, kj * z[e]);
            }
        }
        __syncthreads();
        unstage<CT>(odr, dr, b, h, t0, T);
        unstage<CT>(ordrs, rdrs, b, h, t0, T);
    }
}

// ---------------------------------------------------------------------------------------------
// back_decay: lines = key channels j (rows of G), reverse in time. Gives dk, dlw, du and dS_0.
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
    const Place p(H);
    const int b = p.b, h = p.h, q = p.q;

    float G[LINES][SEG], Z[LINES], du[LINES], uj[LINES];
    UNROLL_LINES {
        float z[SEG];
        load_row(ds_final + p.mat, p.line0 + l, q, G[l]);
        load_row(s_final + p.mat, p.line0 + l, q, z);
        Z[l] = line_sum(dot(G[l], z));
        du[l] = 0.f;
        uj[l] = u[h * N + p.line0 + l];
    }
    Fetch<CT, bf16> f_r, f_k, f_v, f_dy;
    Fetch<CT, float> f_w, f_rd;
    auto fetch = [&](int t) {
        f_r.get(r, b, h, t, T), f_w.get(lw, b, h, t, T), f_k.get(k, b, h, t, T), f_v.get(v, b, h, t, T);
        f_dy.get(dy, b, h, t, T), f_rd.get(rdrs, b, h, t, T);
    };
    fetch((T - 1) / CT * CT);
    for (int t0 = (T - 1) / CT * CT; t0 >= 0; t0 -= CT) {
        __syncthreads();
        f_r.put(sr), f_w.put(sw, Exp()), f_k.put(sk), f_v.put(sv), f_dy.put(sdy), f_rd.put(srd);
        __syncthreads();
        if (t0 - CT >= 0) fetch(t0 - CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = steps - 1; s >= 0; s--) {
            const int o = s * ROW;
            float x[SEG], z[SEG], dks[LINES];
            load_segment(sv + o, q, x);
            load_segment(sdy + o, q, z);
            const float dyv = line_sum(dot(z, x));  // dy_t . v_t
            UNROLL_LINES dks[l] = dot(G[l], x);
            UNROLL_LINES dks[l] = line_sum(dks[l]);
            UNROLL_LINES {
                const int at = o + p.pl + l;
                const float rj = sr[at], kj = sk[at], wj = sw[at];
                const float gl = Z[l] - kj * dks[l];
                if (q == 0) odk[at] = fmaf(uj[l] * rj, dyv, dks[l]), odlw[at] = gl;
                du[l] = fmaf(rj * kj, dyv, du[l]);
                Z[l] = gl + srd[at];
                UNROLL_SEG G[l][e] = fmaf(G[l][e], wj, rj * z[e]);  // G_{t-1}
            }
        }
        __syncthreads();
        unstage<CT>(odk, dk, b, h, t0, T);
        unstage<CT>(odlw, dlw, b, h, t0, T);
    }
    UNROLL_LINES store_row(ds0 + p.mat, p.line0 + l, q, G[l]);
    if (q == 0) UNROLL_LINES du_part[(int64_t(b) * H + h) * N + p.line0 + l] = du[l];
}

// ---------------------------------------------------------------------------------------------
// back_value: lines = value channels i (columns of G), reverse in time. Gives dv.
constexpr int VAL_IN = 5, VAL_OUT = 1, VAL_CT = chunk_steps(VAL_IN + VAL_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_value_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, const float* __restrict__ u,
    Stream<const bf16> dy, const float* __restrict__ ds_final, Stream<bf16> dv) {
    constexpr int CT = VAL_CT;
    __shared__ __align__(16) float sh[(VAL_IN + VAL_OUT) * CT * ROW];
    float *sr = sh, *sru = sr + CT * ROW, *sw = sru + CT * ROW, *sk = sw + CT * ROW, *sdy = sk + CT * ROW,
          *odv = sdy + CT * ROW;
    const Place p(H);
    const int b = p.b, h = p.h, q = p.q;
    const TimesConst times_u{u + h * N};

    float G[LINES][SEG];
    UNROLL_LINES load_col(ds_final + p.mat, p.line0 + l, q, G[l]);
    Fetch<CT, bf16> f_r, f_k, f_dy;
    Fetch<CT, float> f_w;
    auto fetch = [&](int t) {
        f_r.get(r, b, h, t, T), f_w.get(lw, b, h, t, T), f_k.get(k, b, h, t, T), f_dy.get(dy, b, h, t, T);
    };
    fetch((T - 1) / CT * CT);
    for (int t0 = (T - 1) / CT * CT; t0 >= 0; t0 -= CT) {
        __syncthreads();
        f_r.put(sr), f_r.put(sru, times_u), f_w.put(sw, Exp()), f_k.put(sk), f_dy.put(sdy);
        __syncthreads();
        if (t0 - CT >= 0) fetch(t0 - CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = steps - 1; s >= 0; s--) {
            const int o = s * ROW;
            float x[SEG], z[SEG], dvi[LINES];
            load_segment(sru + o, q, x);
            load_segment(sk + o, q, z);
            UNROLL_LINES {
                const float dyi = sdy[o + p.pl + l];
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
                UNROLL_SEG acc[e % 4] = fmaf(z[e], fmaf(dyi, x[e], G[l][e]), acc[e % 4]);  // k (G_t + dy r u)
                dvi[l] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
            }
            UNROLL_LINES dvi[l] = line_sum(dvi[l]);
            if (q == 0) UNROLL_LINES odv[o + p.pl + l] = dvi[l];
            load_segment(sw + o, q, x);
            load_segment(sr + o, q, z);
            UNROLL_LINES {
                const float dyi = sdy[o + p.pl + l];
                UNROLL_SEG G[l][e] = fmaf(G[l][e], x[e], z[e] * dyi);  // G_{t-1}
            }
        }
        __syncthreads();
        unstage<CT>(odv, dv, b, h, t0, T);
    }
}

}  // namespace wkv

#ifndef WKV_KERNELS_ONLY
// ---------------------------------------------------------------------------------------------
// Host side. Python allocates every output (so tests can poison them); here we check what would
// make the kernels read or write out of bounds. lw is [B, T, H, N] (RWKV-6) or [H, N] (RWKV-5).
namespace {

using torch::Tensor;
using cbf = const wkv::bf16;

void check(const Tensor& x, const char* name, at::ScalarType dtype, int64_t numel) {
    wkv_binding::check("wkv_diag", x, name, dtype, numel);
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
#endif  // WKV_KERNELS_ONLY
