// Fused RoPE (interleaved pairs), forward and backward, for Candle (topic 8-08).
//
//   y[2k]   = x[2k]·cos(mθ_k) − x[2k+1]·sin(mθ_k)
//   y[2k+1] = x[2k]·sin(mθ_k) + x[2k+1]·cos(mθ_k)          m = start + position in the sequence
//
// The backward is the same kernel with sin negated: the gradient of a rotation is the inverse
// rotation (R_mᵀ = R_{−m}). x, y (rows = batch·heads·seq, d) contiguous, cos/sin f32 table rows of
// d/2: row m of the tables for the token at position m in the sequence, offset by *start when
// `start` is not null (a position held on the device: 8-10's captured decode step passes the
// whole tables and its device position). One thread per pair; each moves its two elements once,
// in f32 arithmetic.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

template <typename T>
__device__ void rope(const T *x, const float *cos, const float *sin, T *y, int64_t pairs, int64_t seq,
                     int64_t half, float sign, const uint32_t *start) {
  const int64_t first = start != nullptr ? (int64_t)*start : 0;
  GRID_STRIDE(p, pairs) {
    const int64_t k = p % half;
    const int64_t pos = first + (p / half) % seq;
    const float c = cos[pos * half + k], s = sign * sin[pos * half + k];
    const float re = to_f(x[2 * p]), im = to_f(x[2 * p + 1]);
    store(re * c - im * s, y + 2 * p);
    store(re * s + im * c, y + 2 * p + 1);
  }
}

#define ROPE_KERNEL(T, NAME)                                                                          \
  extern "C" __global__ void rope_##NAME(const T *x, const float *cos, const float *sin, T *y,      \
                                         int64_t pairs, int64_t seq, int64_t half, float sign,       \
                                         const uint32_t *start) {                                    \
    rope<T>(x, cos, sin, y, pairs, seq, half, sign, start);                                           \
  }

ROPE_KERNEL(float, f32)
ROPE_KERNEL(__nv_bfloat16, bf16)
ROPE_KERNEL(__half, f16)
