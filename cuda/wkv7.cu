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
#ifndef WKV_KERNELS_ONLY  // defined by `make cuda-check`: compile the kernels alone, fast
#include "wkv_binding.cuh"
#endif

#include "wkv_common.cuh"

namespace wkv {

// ---------------------------------------------------------------------------------------------
// forward: lines = rows i of S (value channels), segment over key channels j.
constexpr int FWD_IN = 6, FWD_OUT = 2, FWD_CT = chunk_steps(FWD_IN + FWD_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) forward_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> v,
    Stream<const bf16> a, Stream<const bf16> bb, const float* __restrict__ s0, Stream<bf16> y, Stream<float> sa_out,
    float* __restrict__ s_final) {
    constexpr int CT = FWD_CT;
    __shared__ __align__(16) float sh[(FWD_IN + FWD_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *sv = sk + CT * ROW, *sa_ = sv + CT * ROW,
          *sb = sa_ + CT * ROW, *oy = sb + CT * ROW, *osa = oy + CT * ROW;
    const Place p(H);
    const int b = p.b, h = p.h, q = p.q;

    float S[LINES][SEG];
    UNROLL_LINES load_row(s0 + p.mat, p.line0 + l, q, S[l]);
    Fetch<CT, bf16> f_r, f_k, f_v, f_a, f_b;
    Fetch<CT, float> f_w;
    auto fetch = [&](int t) {
        f_r.get(r, b, h, t, T), f_w.get(lw, b, h, t, T), f_k.get(k, b, h, t, T);
        f_v.get(v, b, h, t, T), f_a.get(a, b, h, t, T), f_b.get(bb, b, h, t, T);
    };
    fetch(0);
    for (int t0 = 0; t0 < T; t0 += CT) {
        __syncthreads();
        f_r.put(sr), f_w.put(sw, Exp()), f_k.put(sk), f_v.put(sv), f_a.put(sa_), f_b.put(sb);
        __syncthreads();
        if (t0 + CT < T) fetch(t0 + CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = 0; s < steps; s++) {
            const int o = s * ROW;
            float x[SEG], z[SEG], sa[LINES], yi[LINES];
            load_segment(sa_ + o, q, x);
            UNROLL_LINES sa[l] = dot(S[l], x);
            UNROLL_LINES sa[l] = line_sum(sa[l]);
            load_segment(sw + o, q, x);
            load_segment(sb + o, q, z);
            UNROLL_LINES UNROLL_SEG S[l][e] = fmaf(S[l][e], x[e], sa[l] * z[e]);
            load_segment(sk + o, q, x);
            UNROLL_LINES {
                const float vi = sv[o + p.pl + l];
                UNROLL_SEG S[l][e] = fmaf(vi, x[e], S[l][e]);
            }
            load_segment(sr + o, q, x);
            UNROLL_LINES yi[l] = dot(S[l], x);
            UNROLL_LINES yi[l] = line_sum(yi[l]);
            if (q == 0) UNROLL_LINES oy[o + p.pl + l] = yi[l], osa[o + p.pl + l] = sa[l];
        }
        __syncthreads();
        unstage<CT>(oy, y, b, h, t0, T);
        unstage<CT>(osa, sa_out, b, h, t0, T);
    }
    UNROLL_LINES store_row(s_final + p.mat, p.line0 + l, q, S[l]);
}

// ---------------------------------------------------------------------------------------------
// back_rows: lines = rows i of G, reverse in time. Gives dv, dsa and dS_0.
constexpr int ROWS_IN = 6, ROWS_OUT = 2, ROWS_CT = chunk_steps(ROWS_IN + ROWS_OUT);

__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) back_rows_kernel(
    int T, int H, Stream<const bf16> r, Stream<const float> lw, Stream<const bf16> k, Stream<const bf16> a,
    Stream<const bf16> bb, Stream<const bf16> dy, const float* __restrict__ ds_final, Stream<bf16> dv,
    Stream<float> dsa_out, float* __restrict__ ds0) {
    constexpr int CT = ROWS_CT;
    __shared__ __align__(16) float sh[(ROWS_IN + ROWS_OUT) * CT * ROW];
    float *sr = sh, *sw = sr + CT * ROW, *sk = sw + CT * ROW, *sa_ = sk + CT * ROW, *sb = sa_ + CT * ROW,
          *sdy = sb + CT * ROW, *odv = sdy + CT * ROW, *odsa = odv + CT * ROW;
    const Place p(H);
    const int b = p.b, h = p.h, q = p.q;

    float G[LINES][SEG];
    UNROLL_LINES load_row(ds_final + p.mat, p.line0 + l, q, G[l]);
    Fetch<CT, bf16> f_r, f_k, f_a, f_b, f_dy;
    Fetch<CT, float> f_w;
    auto fetch = [&](int t) {
        f_r.get(r, b, h, t, T), f_w.get(lw, b, h, t, T), f_k.get(k, b, h, t, T);
        f_a.get(a, b, h, t, T), f_b.get(bb, b, h, t, T), f_dy.get(dy, b, h, t, T);
    };
    fetch((T - 1) / CT * CT);
    for (int t0 = (T - 1) / CT * CT; t0 >= 0; t0 -= CT) {
        __syncthreads();
        f_r.put(sr), f_w.put(sw, Exp()), f_k.put(sk), f_a.put(sa_), f_b.put(sb), f_dy.put(sdy);
        __syncthreads();
        if (t0 - CT >= 0) fetch(t0 - CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = steps - 1; s >= 0; s--) {
            const int o = s * ROW;
            float x[SEG], z[SEG], dsa[LINES], dvi[LINES];
            load_segment(sr + o, q, x);
            UNROLL_LINES {
                const float dyi = sdy[o + p.pl + l];
                UNROLL_SEG G[l][e] = fmaf(dyi, x[e], G[l][e]);  // G_t
            }
            load_segment(sb + o, q, x);
            load_segment(sk + o, q, z);
            UNROLL_LINES dsa[l] = dot(G[l], x), dvi[l] = dot(G[l], z);
            UNROLL_LINES dsa[l] = line_sum(dsa[l]), dvi[l] = line_sum(dvi[l]);
            if (q == 0) UNROLL_LINES odv[o + p.pl + l] = dvi[l], odsa[o + p.pl + l] = dsa[l];
            load_segment(sw + o, q, x);
            load_segment(sa_ + o, q, z);
            UNROLL_LINES UNROLL_SEG G[l][e] = fmaf(G[l][e], x[e], dsa[l] * z[e]);  // G_t M_t^T
        }
        __syncthreads();
        unstage<CT>(odv, dv, b, h, t0, T);
        unstage<CT>(odsa, dsa_out, b, h, t0, T);
    }
    UNROLL_LINES store_row(ds0 + p.mat, p.line0 + l, q, G[l]);
}

// ---------------------------------------------------------------------------------------------
// back_cols: lines = columns j of S, forward in time (S recomputed from S_0). Gives dr, da and
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
    const Place p(H);
    const int b = p.b, h = p.h, q = p.q;

    float S[LINES][SEG];
    UNROLL_LINES load_col(s0 + p.mat, p.line0 + l, q, S[l]);
    float prev_rdr[LINES];  // r_{t-1} dr_{t-1}
    UNROLL_LINES prev_rdr[l] = 0.f;
    Fetch<CT, bf16> f_r, f_k, f_v, f_a, f_b, f_dy;
    Fetch<CT, float> f_w, f_sa, f_dsa;
    auto fetch = [&](int t) {
        f_r.get(r, b, h, t, T), f_w.get(lw, b, h, t, T), f_k.get(k, b, h, t, T), f_v.get(v, b, h, t, T);
        f_a.get(a, b, h, t, T), f_b.get(bb, b, h, t, T), f_dy.get(dy, b, h, t, T);
        f_sa.get(sa_in, b, h, t, T), f_dsa.get(dsa_in, b, h, t, T);
    };
    fetch(0);
    for (int t0 = 0; t0 < T; t0 += CT) {
        __syncthreads();
        f_r.put(sr), f_w.put(sw, Exp()), f_k.put(sk), f_v.put(sv), f_a.put(sa_), f_b.put(sb), f_dy.put(sdy);
        f_sa.put(ssa), f_dsa.put(sdsa);
        __syncthreads();
        if (t0 + CT < T) fetch(t0 + CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = 0; s < steps; s++) {
            const int o = s * ROW;
            float x[SEG], z[SEG], daj[LINES], drj[LINES];
            load_segment(sdsa + o, q, x);
            UNROLL_LINES daj[l] = dot(S[l], x);  // S_{t-1}^T dsa_t
            UNROLL_LINES daj[l] = line_sum(daj[l]);
            load_segment(ssa + o, q, x);
            load_segment(sv + o, q, z);
            UNROLL_LINES {
                const float wj = sw[o + p.pl + l], bj = sb[o + p.pl + l], kj = sk[o + p.pl + l];
                UNROLL_SEG S[l][e] = fmaf(S[l][e], wj, fmaf(x[e], bj, z[e] * kj));
            }
            load_segment(sdy + o, q, x);
            UNROLL_LINES drj[l] = dot(S[l], x);  // S_t^T dy_t
            UNROLL_LINES drj[l] = line_sum(drj[l]);
            if (q == 0) {
                UNROLL_LINES {
                    odr[o + p.pl + l] = drj[l];
                    oda[o + p.pl + l] = daj[l];
                    ox[o + p.pl + l] = fmaf(sa_[o + p.pl + l], daj[l], prev_rdr[l]);
                }
            }
            UNROLL_LINES prev_rdr[l] = sr[o + p.pl + l] * drj[l];
        }
        __syncthreads();
        unstage<CT>(odr, dr, b, h, t0, T);
        unstage<CT>(oda, da, b, h, t0, T);
        unstage<CT>(ox, x_out, b, h, t0, T);
    }
}

// ---------------------------------------------------------------------------------------------
// back_decay: lines = columns j of G, reverse in time. Gives dk, db and dlw.
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
    const Place p(H);
    const int b = p.b, h = p.h, q = p.q;

    float G[LINES][SEG], Z[LINES];
    UNROLL_LINES load_col(ds_final + p.mat, p.line0 + l, q, G[l]);
    {  // Z_{T-1} = sum_i (dS_T + dy_{T-1} r_{T-1}^T)[i][j] S_T[i][j]
        float x[SEG], z[SEG], dy_last[SEG];
        const bf16* dyp = dy.ptr + dy.offset(b, h, T - 1) + q * SEG;
        UNROLL_SEG dy_last[e] = __bfloat162float(dyp[e]);
        UNROLL_LINES {
            load_col(s_final + p.mat, p.line0 + l, q, z);
            const float r_last = __bfloat162float(r.ptr[r.offset(b, h, T - 1) + p.line0 + l]);
            UNROLL_SEG x[e] = fmaf(dy_last[e], r_last, G[l][e]);
            Z[l] = line_sum(dot(x, z));
        }
    }
    Fetch<CT, bf16> f_r, f_k, f_v, f_a, f_b, f_dy;
    Fetch<CT, float> f_w, f_sa, f_dsa, f_x;
    auto fetch = [&](int t) {
        f_r.get(r, b, h, t, T), f_w.get(lw, b, h, t, T), f_k.get(k, b, h, t, T), f_v.get(v, b, h, t, T);
        f_a.get(a, b, h, t, T), f_b.get(bb, b, h, t, T), f_dy.get(dy, b, h, t, T);
        f_sa.get(sa_in, b, h, t, T), f_dsa.get(dsa_in, b, h, t, T), f_x.get(x_in, b, h, t, T);
    };
    fetch((T - 1) / CT * CT);
    for (int t0 = (T - 1) / CT * CT; t0 >= 0; t0 -= CT) {
        __syncthreads();
        f_r.put(sr), f_w.put(sw, Exp()), f_k.put(sk), f_v.put(sv), f_a.put(sa_), f_b.put(sb), f_dy.put(sdy);
        f_sa.put(ssa), f_dsa.put(sdsa), f_x.put(sx);
        __syncthreads();
        if (t0 - CT >= 0) fetch(t0 - CT);  // in flight during this chunk's steps
        const int steps = min(CT, T - t0);
        for (int s = steps - 1; s >= 0; s--) {
            const int o = s * ROW;
            float x[SEG], z[SEG], dkj[LINES], dbj[LINES];
            load_segment(sdy + o, q, x);
            UNROLL_LINES {
                const float rj = sr[o + p.pl + l];
                UNROLL_SEG G[l][e] = fmaf(x[e], rj, G[l][e]);  // G_t
            }
            load_segment(sv + o, q, x);
            load_segment(ssa + o, q, z);
            UNROLL_LINES dkj[l] = dot(G[l], x), dbj[l] = dot(G[l], z);
            UNROLL_LINES dkj[l] = line_sum(dkj[l]), dbj[l] = line_sum(dbj[l]);
            UNROLL_LINES {
                const int at = o + p.pl + l;
                const float gl = Z[l] - sb[at] * dbj[l] - sk[at] * dkj[l];
                if (q == 0) odk[at] = dkj[l], odb[at] = dbj[l], odlw[at] = gl;
                Z[l] = gl + sx[at];
            }
            load_segment(sdsa + o, q, x);
            UNROLL_LINES {
                const float wj = sw[o + p.pl + l], aj = sa_[o + p.pl + l];
                UNROLL_SEG G[l][e] = fmaf(G[l][e], wj, x[e] * aj);  // G_t M_t^T
            }
        }
        __syncthreads();
        unstage<CT>(odk, dk, b, h, t0, T);
        unstage<CT>(odb, db, b, h, t0, T);
        unstage<CT>(odlw, dlw, b, h, t0, T);
    }
}

}  // namespace wkv

#ifndef WKV_KERNELS_ONLY
// ---------------------------------------------------------------------------------------------
// Host side. Python allocates every output (so tests can poison them) and checks shapes; here we
// check what would make the kernels read or write out of bounds.
namespace {

using torch::Tensor;

void check(const Tensor& x, const char* name, at::ScalarType dtype, int64_t numel) {
    wkv_binding::check("wkv7", x, name, dtype, numel);
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
#endif  // WKV_KERNELS_ONLY
