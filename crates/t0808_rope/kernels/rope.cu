// Fused RoPE (interleaved pairs), forward and backward, for Candle (topic 8-08).
//
//   y[2k]   = x[2k]·cos(mθ_k) − x[2k+1]·sin(mθ_k)
//   y[2k+1] = x[2k]·sin(mθ_k) + x[2k+1]·cos(mθ_k)          m = start + position in the sequence
//
// The backward is the same kernel with sin negated: the gradient of a rotation is the inverse
// rotation (R_mᵀ = R_{−m}). x, y (rows = batch·heads·seq, d) contiguous, cos/sin f32 table rows of
// d/2: row m of the tables for the token at position m in the sequence, offset by *start when
// `start` is not null (a position held on the device: 8-10's captured decode step passes the
// whole tables and its device position). Each thread moves 16 bytes of pairs at a time (one pair at a
// time where the buffers are not aligned), each element once, in f32 arithmetic.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

template <typename T>
__device__ void rope(const T *x, const float *cos, const float *sin, T *y, int64_t pairs, int64_t seq,
                     int64_t half, float sign, const uint32_t *start) {
  const int64_t first = start != nullptr ? (int64_t)*start : 0;
  // 16 bytes (P pairs) per thread and step where x and y are aligned and a row's pairs come in
  // whole packs; the rest (or everything) pair by pair.
  constexpr int N = Pack<T>::N, P = N / 2;
  const int64_t packs = (aligned16(x) && aligned16(y) && half % P == 0) ? pairs / P : 0;
  GRID_STRIDE(q, packs) {
    const int64_t p0 = q * P, k0 = p0 % half;
    const int64_t pos = first + (p0 / half) % seq;
    float v[N];
    load16(x + 2 * p0, v);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const float c = cos[pos * half + k0 + j], s = sign * sin[pos * half + k0 + j];
      const float re = v[2 * j], im = v[2 * j + 1];
      v[2 * j] = re * c - im * s;
      v[2 * j + 1] = re * s + im * c;
    }
    store16(v, y + 2 * p0);
  }
  GRID_STRIDE(r, pairs - packs * P) {
    const int64_t p = packs * P + r;
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
