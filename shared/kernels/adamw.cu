// AdamW in place, for Candle (shared::adamw). Three element-wise kernels per parameter tensor
// instead of a dozen composed ops, and no new allocation:
//
//   adamw_moment   m ← β·m + (1 − β)·(s·g)          (first moment; s = gradient-clipping scale)
//                  v ← β·v + (1 − β)·(s·g)²         (second moment, square = 1)
//   adamw_update   θ ← θ·(1 − lr·λ) − lr · (m / c₁) / (√(v / c₂) + ε)      c₁,₂ = bias corrections
//
// s and the step's go-ahead come from the device: gate = {s, ok} (adamw_gate below). With ok = 0
// (a loss or gradient norm that is not finite) every kernel returns at once: m, v and θ are kept.
// Arithmetic in f32 (f64 for f64 tensors), one rounding per stored value. Grid-stride loops.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

template <typename T, typename A>
__device__ void moment(T *m, const T *g, int64_t n, A beta, const double *gate, int square) {
  if (gate[1] == 0.0) return;
  const A scale = A(gate[0]);
  GRID_STRIDE(i, n) {
    A gi = scale * to_f(g[i]);
    if (square) gi = gi * gi;
    store(beta * to_f(m[i]) + (A(1) - beta) * gi, m + i);
  }
}

template <typename T, typename A>
__device__ void update(T *theta, const T *m, const T *v, int64_t n, A lr, A decay, A eps, A bc1, A bc2,
                       const double *gate) {
  if (gate[1] == 0.0) return;
  GRID_STRIDE(i, n) {
    const A step = (to_f(m[i]) / bc1) / (sqrt(to_f(v[i]) / bc2) + eps);
    store(to_f(theta[i]) * (A(1) - lr * decay) - lr * step, theta + i);
  }
}

#define ADAMW_KERNELS(T, A, NAME)                                                                        \
  extern "C" __global__ void adamw_moment_##NAME(T *m, const T *g, int64_t n, A beta,                  \
                                                 const double *gate, int square) {                      \
    moment<T, A>(m, g, n, beta, gate, square);                                                           \
  }                                                                                                      \
  extern "C" __global__ void adamw_update_##NAME(T *theta, const T *m, const T *v, int64_t n, A lr,    \
                                                 A decay, A eps, A bc1, A bc2, const double *gate) {    \
    update<T, A>(theta, m, v, n, lr, decay, eps, bc1, bc2, gate);                                       \
  }

ADAMW_KERNELS(float, float, f32)
ADAMW_KERNELS(double, double, f64)
ADAMW_KERNELS(__nv_bfloat16, float, bf16)
ADAMW_KERNELS(__half, float, f16)

// gate = {s, ok} from Σg² and the loss (one thread): ‖g‖ = √Σg² (an f32 root, as the host takes
// it), ok = ‖g‖ and the loss are finite, s = max_norm / (‖g‖ + 1e-6) when ok and ‖g‖ > max_norm
// (max_norm <= 0: no clipping), else 1.
extern "C" __global__ void adamw_gate(const float *sum_sq, const float *loss, double max_norm, double *gate) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const double norm = (double)sqrtf(sum_sq[0]);
  const bool ok = isfinite(norm) && isfinite(loss[0]);
  gate[0] = (ok && max_norm > 0.0 && norm > max_norm) ? max_norm / (norm + 1e-6) : 1.0;
  gate[1] = ok ? 1.0 : 0.0;
}

// Σ x² of a whole tensor into out[0] (f32, zeroed by the caller), for the gradient norm: each
// thread sums its grid-stride share in f32, the warp and then the block reduce, and one atomic
// add per block lands the block's sum.
template <typename T>
__device__ void sum_of_squares(const T *x, float *out, int64_t n) {
  float s = 0.0f;
  GRID_STRIDE(i, n) {
    const float v = (float)to_f(x[i]);
    s += v * v;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ float warp_sums[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) atomicAdd(out, s);
  }
}

#define SUMSQ_KERNEL(T, NAME)                                                                        \
  extern "C" __global__ void sum_of_squares_##NAME(const T *x, float *out, int64_t n) {            \
    sum_of_squares<T>(x, out, n);                                                                    \
  }

SUMSQ_KERNEL(float, f32)
SUMSQ_KERNEL(double, f64)
SUMSQ_KERNEL(__nv_bfloat16, bf16)
SUMSQ_KERNEL(__half, f16)
