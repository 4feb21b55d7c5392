// cuda/wkv_diag_chunked.cu's launches on the CPU (see cuda_cpu.h), with a C interface for ctypes.
// Tensors are passed as raw pointers to contiguous [B, T, H, N] (and [B, H, N, N], [H, N]) CPU memory.
#include "../../cuda/wkv_diag_chunked.cu"

using wkvdc::bf16;

extern "C" {

int head_size() { return wkvdc::N; }
int chunk_len() { return wkvdc::L; }
float log_decay_min() { return wkvdc::LW_MIN; }
int valid_split(int split) { return wkvdc::valid_split(split); }

// lw_per_step: lw is [B, T, H, N], else [H, N] for every step. split: blocks per head (1, 2 or 4 where
// the head size allows); returns 0 for any other.
int forward(int split, int B, int T, int H, const bf16* r, const float* lw, int lw_per_step, const bf16* k,
            const bf16* v, const float* u, const float* s0, bf16* y, float* s_final, bf16* states) {
    return wkvdc::launch_forward(nullptr, split, B, T, H, wkvdc::Inputs{r, k, v, lw, u, lw_per_step != 0}, s0, y,
                                 s_final, states);
}

int backward(int split, int B, int T, int H, const bf16* r, const float* lw, int lw_per_step, const bf16* k,
             const bf16* v, const float* u, const bf16* states, const bf16* dy, const float* ds_final, bf16* dr,
             float* dlw, bf16* dk, bf16* dv, float* du, float* ds0) {
    return wkvdc::launch_backward(nullptr, split, B, T, H, wkvdc::Inputs{r, k, v, lw, u, lw_per_step != 0}, dy,
                                  states, ds_final, wkvdc::Grads{dr, dk, dv, dlw, du}, ds0);
}

}  // extern "C"
