// cuda/wkv7_chunked.cu's forward and backward as a program, for g++'s sanitizers: every split the head
// size allows, a T that needs padding and one that does not, with and without an initial state.
//
// Under ThreadSanitizer (-fsanitize=thread): the emulation (cuda_cpu.h) runs each CUDA thread as a
// std::thread and each barrier as a std::barrier, so the sanitizer sees the kernel's shared-memory
// accesses and the barriers that order them. A write and a read (or two writes) of the same bytes by
// two threads with no barrier between them is reported, whether or not this run's timing made it go
// wrong: the hazard compute-sanitizer's racecheck looks for on a GPU. Under AddressSanitizer
// (-fsanitize=address): every input and output is a buffer of exactly its size, and so is each
// block's shared memory, so an access past any of them is reported.
//
// Inputs are random (the arithmetic is checked elsewhere, against float64: tests/
// test_wkv7_chunked_emulated.py). Exits 0 when every launch ran, 3 when one was refused; with the
// sanitizer's exit code (66 for threads, 1 for addresses) when it reported anything.
#include <random>

#include "wkv7_chunked.cpp"

namespace {

std::vector<bf16> random_bf16(size_t n, std::mt19937& gen, float scale) {
    std::normal_distribution<float> normal(0.f, scale);
    std::vector<bf16> out(n);
    for (auto& x : out) x = __float2bfloat16(normal(gen));
    return out;
}

bool run(int split, int B, int T, int H, bool with_state, unsigned seed) {
    const int N = wkv7c::N;
    const size_t n = size_t(B) * T * H * N, ns = size_t(B) * H * N * N;
    const size_t chunks = size_t(T + wkv7c::L - 1) / wkv7c::L;
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> decay(-0.6f, -0.01f), state(-1.f, 1.f);
    auto r = random_bf16(n, gen, 1.f), k = random_bf16(n, gen, 1.f), v = random_bf16(n, gen, 1.f);
    auto a = random_bf16(n, gen, 0.1f), b = random_bf16(n, gen, 0.1f), dy = random_bf16(n, gen, 1.f);
    std::vector<float> lw(n), s0(ns, 0.f), ds_final(ns);
    for (auto& x : lw) x = decay(gen);
    if (with_state)
        for (auto& x : s0) x = state(gen);
    for (auto& x : ds_final) x = state(gen);

    std::vector<bf16> y(n), states(size_t(B) * H * chunks * N * N), sa(n), dr(n), dk(n), dv(n), da(n), db(n);
    std::vector<float> s_final(ns), dlw(n), ds0(ns);
    if (!forward(split, B, T, H, r.data(), lw.data(), k.data(), v.data(), a.data(), b.data(), s0.data(), y.data(),
                 s_final.data(), states.data(), sa.data()))
        return false;
    return backward(split, B, T, H, r.data(), lw.data(), k.data(), v.data(), a.data(), b.data(), states.data(),
                    sa.data(), dy.data(), ds_final.data(), dr.data(), dlw.data(), dk.data(), dv.data(), da.data(),
                    db.data(), ds0.data());
}

}  // namespace

int main() {
    unsigned seed = 0;
    for (int split : {1, 2, 4}) {
        if (!wkv7c::valid_split(split)) continue;
        // T = 2 L + 5: three chunks, the last padded; T = L: one whole chunk.
        for (int T : {2 * wkv7c::L + 5, wkv7c::L}) {
            const bool with_state = T == wkv7c::L;
            if (!run(split, 1, T, 2, with_state, seed++)) {
                std::fprintf(stderr, "split %d, T %d: the launch was refused\n", split, T);
                return 3;
            }
            std::printf("N %d split %d T %d state %d: ran\n", wkv7c::N, split, T, int(with_state));
        }
    }
    return 0;
}
