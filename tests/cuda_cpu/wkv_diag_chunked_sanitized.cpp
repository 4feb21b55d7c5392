// cuda/wkv_diag_chunked.cu's forward and backward as a program, for g++'s sanitizers (see
// wkv7_chunked_sanitized.cpp for what each reports): every split the head size allows, a T that needs
// padding and one that does not, with and without an initial state, RWKV-6's per-step log-decays and
// RWKV-5's one per channel.
// Inputs are random (the arithmetic is checked against float64 in
// tests/test_wkv_diag_chunked_emulated.py). Exits 0 when every launch ran, 3 when one was refused, with
// the sanitizer's exit code when it reported anything.
#include <random>

#include "wkv_diag_chunked.cpp"

namespace {

bool run(int split, int B, int T, int H, bool with_state, bool per_step, unsigned seed) {
    const int N = wkvdc::N;
    const size_t n = size_t(B) * T * H * N, ns = size_t(B) * H * N * N;
    const size_t chunks = size_t(T + wkvdc::L - 1) / wkvdc::L;
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_real_distribution<float> decay(-12.f, -0.01f), unit(-1.f, 1.f);  // some below LW_MIN
    std::vector<bf16> r(n), k(n), v(n), dy(n);
    for (auto* x : {&r, &k, &v, &dy})
        for (auto& e : *x) e = __float2bfloat16(normal(gen));
    std::vector<float> lw(per_step ? n : size_t(H) * N), u(size_t(H) * N), s0(ns, 0.f), ds_final(ns);
    for (auto& x : lw) x = decay(gen);
    for (auto& x : u) x = unit(gen);
    if (with_state)
        for (auto& x : s0) x = unit(gen);
    for (auto& x : ds_final) x = unit(gen);

    std::vector<bf16> y(n), states(size_t(B) * H * chunks * N * N), dr(n), dk(n), dv(n);
    std::vector<float> s_final(ns), dlw(n), du(size_t(B) * H * N), ds0(ns);
    if (!forward(split, B, T, H, r.data(), lw.data(), per_step, k.data(), v.data(), u.data(), s0.data(), y.data(),
                 s_final.data(), states.data()))
        return false;
    return backward(split, B, T, H, r.data(), lw.data(), per_step, k.data(), v.data(), u.data(), states.data(),
                    dy.data(), ds_final.data(), dr.data(), dlw.data(), dk.data(), dv.data(), du.data(), ds0.data());
}

}  // namespace

int main() {
    unsigned seed = 0;
    for (int split : {1, 2, 4}) {
        if (!wkvdc::valid_split(split)) continue;
        // T = 2 L + 5: three chunks, the last padded; T = L: one whole chunk.
        for (int T : {2 * wkvdc::L + 5, wkvdc::L})
            for (bool per_step : {true, false}) {
                const bool with_state = T == wkvdc::L;
                if (!run(split, 1, T, 2, with_state, per_step, seed++)) {
                    std::fprintf(stderr, "split %d, T %d: the launch was refused\n", split, T);
                    return 3;
                }
                std::printf("N %d split %d T %d state %d per-step lw %d: ran\n", wkvdc::N, split, T, int(with_state),
                            int(per_step));
            }
    }
    return 0;
}
