// AdamW in place, for Candle (shared::adamw). Three element-wise kernels per parameter tensor
// instead of a dozen composed ops, and no new allocation (adamw_multi below: one kernel for every
// tensor of the model):
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
// The block's sum of every thread's s, valid in thread 0 (a fixed order of additions).
__device__ __forceinline__ float block_sum(float s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ float warp_sums[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = s;
  __syncthreads();
  s = 0.0f;
  if (warp == 0) {
    s = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  }
  return s;
}

// Adds the block's sum of every thread's s to *out with one atomic add.
__device__ __forceinline__ void block_sum_into(float s, float *out) {
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(out, s);
}

template <typename T>
__device__ void sum_of_squares(const T *x, float *out, int64_t n) {
  float s = 0.0f;
  GRID_STRIDE(i, n) {
    const float v = (float)to_f(x[i]);
    s += v * v;
  }
  block_sum_into(s, out);
}

#define SUMSQ_KERNEL(T, NAME)                                                                        \
  extern "C" __global__ void sum_of_squares_##NAME(const T *x, float *out, int64_t n) {            \
    sum_of_squares<T>(x, out, n);                                                                    \
  }

SUMSQ_KERNEL(float, f32)
SUMSQ_KERNEL(double, f64)
SUMSQ_KERNEL(__nv_bfloat16, bf16)
SUMSQ_KERNEL(__half, f16)

// ---- Every tensor in one launch --------------------------------------------------------------
//
// A model has dozens of parameter tensors, most of them small: one launch each (three for AdamW,
// one for Σg²) costs more host time and tail than the arithmetic. The multi-tensor kernels take a
// table of the tensors in device memory (u64 words):
//
//   adamw_multi:           [θ ptrs | m ptrs | v ptrs | g ptrs | start (tensors + 1) | decay (f64 bits)]
//   adamw_multi_master:    the same, then [copy ptrs]
//   sum_of_squares_multi:  [g ptrs | start (tensors + 1)]
//
// where start[t] is the index of tensor t's first element in the concatenation of all of them and
// start[tensors] the total. Each thread walks the concatenation with a grid-stride loop and moves
// to the next tensor when its index passes the tensor's end (the index only grows). The
// arithmetic is the per-tensor kernels', rounding m and v before the update reads them, so both
// paths store the same values.

//
// Mixed precision with master weights (adamw_multi_master): θ, m, v are the f32 master weights and
// moments; the model computes with copies of θ in G (bf16 or f16), whose gradients g are in G too.
// The kernel reads g in G and, after the update, writes θ rounded to G into the copy: the cast the
// next forward pass would otherwise make, in the same pass.
template <typename T, typename G, typename A, bool COPY>
__device__ void adamw_multi(const uint64_t *table, int tensors, A lr, A beta1, A beta2, A eps, A bc1, A bc2,
                            const double *gate) {
  if (gate[1] == 0.0) return;
  T *const *theta = reinterpret_cast<T *const *>(table);
  T *const *m = reinterpret_cast<T *const *>(table + tensors);
  T *const *v = reinterpret_cast<T *const *>(table + 2 * tensors);
  const G *const *g = reinterpret_cast<const G *const *>(table + 3 * tensors);
  const int64_t *start = reinterpret_cast<const int64_t *>(table + 4 * tensors);
  const double *decay = reinterpret_cast<const double *>(table + 5 * tensors + 1);
  G *const *copy = reinterpret_cast<G *const *>(table + 6 * tensors + 1);
  const A scale = A(gate[0]);
  int t = 0;
  GRID_STRIDE(i, start[tensors]) {
    while (i >= start[t + 1]) ++t;
    const int64_t j = i - start[t];
    const A gi = scale * to_f(g[t][j]);
    T mj, vj;
    store(beta1 * to_f(m[t][j]) + (A(1) - beta1) * gi, &mj);
    store(beta2 * to_f(v[t][j]) + (A(1) - beta2) * (gi * gi), &vj);
    m[t][j] = mj;
    v[t][j] = vj;
    const A step = (to_f(mj) / bc1) / (sqrt(to_f(vj) / bc2) + eps);
    T tj;
    store(to_f(theta[t][j]) * (A(1) - lr * A(decay[t])) - lr * step, &tj);
    theta[t][j] = tj;
    if (COPY) store(to_f(tj), copy[t] + j);
  }
}

// Σ g² over every tensor of the table, deterministically (the clipping factor, and so the whole
// training run, must not depend on the order in which blocks finish): each block writes its
// partial sum to partials[block]; sum_partials then adds the partials in a fixed order.
template <typename T>
__device__ void sum_of_squares_multi(const uint64_t *table, int tensors, float *partials) {
  const T *const *g = reinterpret_cast<const T *const *>(table);
  const int64_t *start = reinterpret_cast<const int64_t *>(table + tensors);
  float s = 0.0f;
  int t = 0;
  GRID_STRIDE(i, start[tensors]) {
    while (i >= start[t + 1]) ++t;
    const float x = (float)to_f(g[t][i - start[t]]);
    s += x * x;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// *out += Σ partials[0..n), one block, in a fixed order.
extern "C" __global__ void sum_partials(const float *partials, int n, float *out) {
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out += s;
}

#define MULTI_KERNELS(T, A, NAME)                                                                         \
  extern "C" __global__ void adamw_multi_##NAME(const uint64_t *table, int tensors, A lr, A beta1,      \
                                                A beta2, A eps, A bc1, A bc2, const double *gate) {     \
    adamw_multi<T, T, A, false>(table, tensors, lr, beta1, beta2, eps, bc1, bc2, gate);                  \
  }                                                                                                       \
  extern "C" __global__ void sum_of_squares_multi_##NAME(const uint64_t *table, int tensors,              \
                                                         float *partials) {                              \
    sum_of_squares_multi<T>(table, tensors, partials);                                                    \
  }

MULTI_KERNELS(float, float, f32)
MULTI_KERNELS(double, double, f64)
MULTI_KERNELS(__nv_bfloat16, float, bf16)
MULTI_KERNELS(__half, float, f16)

#define MASTER_KERNEL(G, NAME)                                                                           \
  extern "C" __global__ void adamw_multi_master_f32_##NAME(const uint64_t *table, int tensors, float lr, \
                                                           float beta1, float beta2, float eps, float bc1, \
                                                           float bc2, const double *gate) {              \
    adamw_multi<float, G, float, true>(table, tensors, lr, beta1, beta2, eps, bc1, bc2, gate);            \
  }

MASTER_KERNEL(__nv_bfloat16, bf16)
MASTER_KERNEL(__half, f16)
