// cuda/wkv7_chunked.cu's launches on the CPU (see cuda_cpu.h), with a C interface for ctypes.
// Tensors are passed as raw pointers to contiguous [B, T, H, N] (and [B, H, N, N]) CPU memory.
#include "../../cuda/wkv7_chunked.cu"

using wkv7c::bf16;

extern "C" {

int head_size() { return wkv7c::N; }
int chunk_len() { return wkv7c::L; }
float log_decay_min() { return wkv7c::LW_MIN; }
int valid_split(int split) { return wkv7c::valid_split(split); }

// split: blocks per head (1, 2 or 4 where the head size allows); returns 0 for any other.
int forward(int split, int B, int T, int H, const bf16* r, const float* lw, const bf16* k, const bf16* v, const bf16* a,
             const bf16* b, const float* s0, bf16* y, float* s_final, bf16* states, bf16* sa) {
    return wkv7c::launch_forward(nullptr, split, B, T, H, wkv7c::Inputs{r, k, v, a, b, lw}, s0, y, s_final, states,
                                 sa);
}

int backward(int split, int B, int T, int H, const bf16* r, const float* lw, const bf16* k, const bf16* v, const bf16* a,
              const bf16* b, const bf16* states, const bf16* sa, const bf16* dy, const float* ds_final, bf16* dr,
              float* dlw, bf16* dk, bf16* dv, bf16* da, bf16* db, float* ds0) {
    return wkv7c::launch_backward(nullptr, split, B, T, H, wkv7c::Inputs{r, k, v, a, b, lw}, dy,
                                  wkv7c::Saved{states, sa}, ds_final, wkv7c::Grads{dr, dk, dv, da, db, dlw}, ds0);
}

}  // extern "C"
