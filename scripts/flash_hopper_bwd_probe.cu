// A standalone probe of 8-09's Hopper backward (kernels/flash_attn_hopper.cu), without Candle:
// correctness of the shipped kernel and its variants on ragged shapes (dQ, dK, dV against plain
// fp32 reference kernels below), and backward TFLOP/s side by side at the benchmark's shapes
// (262,144 tokens per call). For fast iteration on the kernel; the numbers a report quotes come
// from `t0809_flash_attention bench`.
//
// The shipped kernels flash_bwd_wgmma_bf16_d64 and _d128 beside the variant below (their
// baseline, the mma.sync backward, is not in this probe: `bench` times it). Earlier organisations
// are in git: each consumer sending its own share of dQ (the kernel of 63ddd6e, timed by this
// probe at 8591b15), three Q/dO stages (no faster, to 44b14a5); and in the run folders, with what
// they measured.
//
// Build (here, no GPU needed):
//   nvcc -O3 -std=c++17 --use_fast_math -gencode arch=compute_90a,code=sm_90a \
//        -o flash_hopper_bwd_probe scripts/flash_hopper_bwd_probe.cu
// Run on an H100/H200: ./flash_hopper_bwd_probe
// Arguments: kernel names (ALL_KERNELS below) run only those, e.g. `shipped 'red dq'`; without
// any, all of them.
// PROBE_CHECK_ONLY=1 stops after the correctness checks (for compute-sanitizer).
// Profile: ./flash_hopper_bwd_probe profile [names] launches each kernel once (4,096 keys, no
// mask, 64 heads) and nothing else, for Nsight Compute:
//   ncu --set full -k regex:bwd ./flash_hopper_bwd_probe profile
// (add -lineinfo to the build and --import-source yes to ncu for stall reasons per source line)

#include "../crates/t0809_flash_attention/kernels/flash_attn_hopper.cu"
#include "flash_hopper_probe_common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

// The variant beside the shipped kernels: "red dq", the d 64 kernel adding dQ_i from its
// registers by reductions in L2 (bwd_wgmma's DQ_RED = true, red_dq) instead of staging it for one
// bulk reduce-add per tile (send_dq): 0.97–1.00× with dQ one tile late, on an H100
// (reports/gpu-runs/h100-2026-12-07-d). Measured and dropped there: the two consumers taking turns
// at the tensor cores (take_turn / pass_turn around each burst of products, as both d 64
// forwards do), 0.94–0.98×.
// Measured and dropped (this probe at 30ccff4..44b14a5, reports/gpu-runs/h200-2026-12-06/call1/probe_bwd.txt):
// K_c (and V_c) held in registers as the A operands of Sᵀ and dPᵀ, 0.98–0.99× (0.80–0.83×,
// spilling), and dQ_i staged in rows padded against the bank conflicts with one bulk reduce-add per
// row, 0.80–0.86×. At a7b6557 (reports/gpu-runs/h100-2026-12-07/README.md): L and D fetched a tile
// ahead into shared memory, 0.93–1.00×; dQ from registers at d 128, 0.96–0.99×; FlashAttention-3's
// 128-query tiles at d 64 (that folder's call1/bwd_q128.cuh), 0.96–1.02×.
#define COMMA ,
#define BWD_VARIANT(NAME, CALL)                                                                              \
  extern "C" __global__ void __launch_bounds__(384, 1)                                                       \
      NAME(const __grid_constant__ hopper::TensorMap tmQ, const __grid_constant__ hopper::TensorMap tmK,     \
           const __grid_constant__ hopper::TensorMap tmV, const __grid_constant__ hopper::TensorMap tmdO,    \
           const float* LSE, const float* Dsum, float* dQacc, bf16* dK, bf16* dV, int n_q, int n_k, int d,     \
           float scale, float scale_log2, int causal, const int* kv_len) {                                   \
    hopper::CALL(&tmQ, &tmK, &tmV, &tmdO, LSE, Dsum, dQacc, dK, dV, n_q, n_k, scale, scale_log2, causal,     \
                 kv_len);                                                                                    \
  }
BWD_VARIANT(bwd_red_dq, bwd_wgmma<bf16 COMMA 64 COMMA 2 COMMA true>)

typedef void (*Bwd)(hopper::TensorMap, hopper::TensorMap, hopper::TensorMap, hopper::TensorMap, const float*,
                    const float*, float*, bf16*, bf16*, int, int, int, float, float, int, const int*);
// The kernels, in the order they run (the first of each head size is the ratios' base).
struct Kernel {
  const char* name;
  Bwd fn;
  int d, smem;
};
static const Kernel ALL_KERNELS[] = {
    {"shipped", flash_bwd_wgmma_bf16_d64, 64, hopper::bwd_smem_bytes<bf16, 64, 2>()},
    {"red dq", bwd_red_dq, 64, hopper::bwd_smem_bytes<bf16, 64, 2>()},
    {"d128", flash_bwd_wgmma_bf16_d128, 128, hopper::bwd_smem_bytes<bf16, 128, 2>()},
};
static std::vector<Kernel> KERNELS;  // the selection (command line)

// ---- fp32 references (one thread per query or key) ----
__device__ bool visible(int i, int j, int n_q, int n_k, int n_kr, int causal) {
  return j < n_kr && !(causal && j > i + n_k - n_q);
}
__device__ float dotb(const bf16* a, const bf16* b, int d) {
  float s = 0.f;
  for (int c = 0; c < d; ++c) s += __bfloat162float(a[c]) * __bfloat162float(b[c]);
  return s;
}
// D = rowsum(dO ∘ O).
__global__ void ref_dot(const bf16* dO, const float* O, float* Dm, int rows, int d) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float s = 0.f;
  for (int c = 0; c < d; ++c) s += __bfloat162float(dO[(size_t)r * d + c]) * O[(size_t)r * d + c];
  Dm[r] = s;
}
// dK and dV of each key.
__global__ void ref_bwd_kv(const bf16* Q, const bf16* K, const bf16* V, const bf16* dO, const float* L, const float* Dm,
                           float* dK, float* dV, int n_q, int n_k, int d, float scale, int causal, const int* kvl) {
  const int bh = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n_k) return;
  const int n_kr = kvl ? min(n_k, kvl[bh]) : n_k;
  const bf16* k = K + ((size_t)bh * n_k + j) * d;
  const bf16* v = V + ((size_t)bh * n_k + j) * d;
  float dk[128] = {0.f}, dv[128] = {0.f};
  for (int i = 0; i < n_q; ++i) {
    if (!visible(i, j, n_q, n_k, n_kr, causal)) continue;
    const bf16* q = Q + ((size_t)bh * n_q + i) * d;
    const bf16* g = dO + ((size_t)bh * n_q + i) * d;
    const float p = expf(scale * dotb(q, k, d) - L[(size_t)bh * n_q + i]);
    const float ds = p * (dotb(g, v, d) - Dm[(size_t)bh * n_q + i]);
    for (int c = 0; c < d; ++c) {
      dv[c] += p * __bfloat162float(g[c]);
      dk[c] += ds * scale * __bfloat162float(q[c]);
    }
  }
  for (int c = 0; c < d; ++c) {
    dK[((size_t)bh * n_k + j) * d + c] = dk[c];
    dV[((size_t)bh * n_k + j) * d + c] = dv[c];
  }
}
// dQ of each query.
__global__ void ref_bwd_q(const bf16* Q, const bf16* K, const bf16* V, const bf16* dO, const float* L, const float* Dm,
                          float* dQ, int n_q, int n_k, int d, float scale, int causal, const int* kvl) {
  const int bh = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_q) return;
  const int n_kr = kvl ? min(n_k, kvl[bh]) : n_k;
  const bf16* q = Q + ((size_t)bh * n_q + i) * d;
  const bf16* g = dO + ((size_t)bh * n_q + i) * d;
  float dq[128] = {0.f};
  for (int j = 0; j < n_k; ++j) {
    if (!visible(i, j, n_q, n_k, n_kr, causal)) continue;
    const bf16* k = K + ((size_t)bh * n_k + j) * d;
    const float p = expf(scale * dotb(q, k, d) - L[(size_t)bh * n_q + i]);
    const float ds = p * (dotb(g, V + ((size_t)bh * n_k + j) * d, d) - Dm[(size_t)bh * n_q + i]);
    for (int c = 0; c < d; ++c) dq[c] += ds * scale * __bfloat162float(k[c]);
  }
  for (int c = 0; c < d; ++c) dQ[((size_t)bh * n_q + i) * d + c] = dq[c];
}

// The kernel's launch on these buffers, its tensor maps built and its shared memory set here, so
// that a timed window holds only the launch.
static auto prepared(const Kernel& kern, const bf16* q, const bf16* k, const bf16* v, const bf16* dO, const float* L,
                     const float* Dm, float* dQacc, bf16* dK, bf16* dV, int bh, int n_q, int n_k, bool causal,
                     const int* kvl) {
  const int d = kern.d, smem = kern.smem;
  CHECK(cudaFuncSetAttribute(kern.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const hopper::TensorMap mq = make_map(q, d, n_q, bh, 64), mdo = make_map(dO, d, n_q, bh, 64);
  const hopper::TensorMap mk = make_map(k, d, n_k, bh, 128), mv = make_map(v, d, n_k, bh, 128);
  const float scale = 1.f / sqrtf((float)d);
  const Bwd fn = kern.fn;
  return [=]() {
    fn<<<dim3((n_k + 127) / 128, bh), 384, smem>>>(mq, mk, mv, mdo, L, Dm, dQacc, dK, dV, n_q, n_k, d, scale,
                                                   scale * 1.4426950408889634f, causal, kvl);
    CHECK(cudaGetLastError());
  };
}

template <typename X>
X* dev(size_t n) {
  X* p;
  CHECK(cudaMalloc(&p, n * sizeof(X)));
  return p;
}
static bf16* rnd(size_t n, unsigned seed) {
  std::vector<bf16> h(n);
  srand(seed);
  for (auto& x : h) x = __float2bfloat16((rand() / (float)RAND_MAX) * 2.f - 1.f);
  bf16* p = dev<bf16>(n);
  CHECK(cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice));
  return p;
}
static std::vector<float> f32(const float* p, size_t n) {
  std::vector<float> h(n);
  CHECK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost));
  return h;
}
static std::vector<float> b16(const bf16* p, size_t n) {
  std::vector<bf16> h(n);
  CHECK(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> o(n);
  for (size_t i = 0; i < n; ++i) o[i] = __bfloat162float(h[i]);
  return o;
}
// Largest |a - b| (infinite on a NaN), and the largest |b| in *mx.
static double err(const std::vector<float>& a, const std::vector<float>& b, double* mx) {
  double e = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e = std::isnan(a[i]) ? INFINITY : fmax(e, fabs(a[i] - b[i]));
    m = fmax(m, fabs(b[i]));
  }
  *mx = m;
  return e;
}

// Every kernel of head size d against the references on one shape (bf16 inputs).
static bool check(int d, int bh, int n_q, int n_k, bool causal, bool padded) {
  const size_t nq = (size_t)bh * n_q * d, nk = (size_t)bh * n_k * d;
  bf16 *q = rnd(nq, 1), *k = rnd(nk, 2), *v = rnd(nk, 3), *dO = rnd(nq, 4);
  int* kvl = nullptr;
  if (padded) {
    std::vector<int> h(bh);
    for (int i = 0; i < bh; ++i) h[i] = std::max(1, (n_k * (i + 1)) / (bh + 1));
    kvl = dev<int>(bh);
    CHECK(cudaMemcpy(kvl, h.data(), bh * 4, cudaMemcpyHostToDevice));
  }
  float *O = dev<float>(nq), *L = dev<float>(bh * n_q), *Dm = dev<float>(bh * n_q);
  float *rdq = dev<float>(nq), *rdk = dev<float>(nk), *rdv = dev<float>(nk), *dqa = dev<float>(nq);
  bf16 *dk = dev<bf16>(nk), *dv = dev<bf16>(nk);
  const float scale = 1.f / sqrtf((float)d);
  reference_fwd<<<dim3((n_q + 63) / 64, bh), 64>>>(q, k, v, O, L, n_q, n_k, d, scale, causal, kvl);
  ref_dot<<<(bh * n_q + 127) / 128, 128>>>(dO, O, Dm, bh * n_q, d);
  ref_bwd_kv<<<dim3((n_k + 63) / 64, bh), 64>>>(q, k, v, dO, L, Dm, rdk, rdv, n_q, n_k, d, scale, causal, kvl);
  ref_bwd_q<<<dim3((n_q + 63) / 64, bh), 64>>>(q, k, v, dO, L, Dm, rdq, n_q, n_k, d, scale, causal, kvl);
  const auto ref_q = f32(rdq, nq), ref_k = f32(rdk, nk), ref_v = f32(rdv, nk);
  bool all = true;
  printf("check d %d bh %d n_q %d n_k %d causal %d padded %d:", d, bh, n_q, n_k, causal, padded);
  for (const Kernel& kern : KERNELS) {
    if (kern.d != d) continue;
    CHECK(cudaMemset(dqa, 0, nq * 4));
    CHECK(cudaMemset(dk, 0xFF, nk * 2));  // NaN: a key the kernel does not write fails the check
    CHECK(cudaMemset(dv, 0xFF, nk * 2));
    prepared(kern, q, k, v, dO, L, Dm, dqa, dk, dv, bh, n_q, n_k, causal, kvl)();
    CHECK(cudaDeviceSynchronize());
    auto a = f32(dqa, nq);
    for (auto& x : a) x *= scale;
    double m1, m2, m3;
    const double e1 = err(a, ref_q, &m1), e2 = err(b16(dk, nk), ref_k, &m2), e3 = err(b16(dv, nk), ref_v, &m3);
    const bool ok = e1 <= 2e-2 * m1 + 1e-3 && e2 <= 2e-2 * m2 + 1e-3 && e3 <= 2e-2 * m3 + 1e-3;
    printf(" | %s dQ %.1e dK %.1e dV %.1e %s", kern.name, e1, e2, e3, ok ? "ok" : "FAIL");
    all &= ok;
  }
  printf("\n");
  for (void* p : {(void*)q, (void*)k, (void*)v, (void*)dO, (void*)O, (void*)L, (void*)Dm, (void*)rdq, (void*)rdk,
                  (void*)rdv, (void*)dqa, (void*)dk, (void*)dv, (void*)kvl})
    cudaFree(p);
  return all;
}

static float median(std::vector<float> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// One launch of each kernel at 4,096 keys without the mask (see the header).
static void profile() {
  const int n = 4096, bh = 262144 / n;
  for (const Kernel& kern : KERNELS) {
    const size_t ne = (size_t)bh * n * kern.d;
    bf16 *q = rnd(ne, 11), *k = rnd(ne, 12), *v = rnd(ne, 13), *dO = rnd(ne, 14), *dk = dev<bf16>(ne),
         *dv = dev<bf16>(ne);
    float *L = dev<float>(bh * n), *Dm = dev<float>(bh * n), *dqa = dev<float>(ne);
    CHECK(cudaMemset(L, 0, bh * n * 4));
    CHECK(cudaMemset(Dm, 0, bh * n * 4));
    CHECK(cudaMemset(dqa, 0, ne * 4));
    prepared(kern, q, k, v, dO, L, Dm, dqa, dk, dv, bh, n, n, false, nullptr)();
    CHECK(cudaDeviceSynchronize());
    printf("profiled %s (d %d, %d keys, %d heads)\n", kern.name, kern.d, n, bh);
    for (void* x : {(void*)q, (void*)k, (void*)v, (void*)dO, (void*)dk, (void*)dv, (void*)L, (void*)Dm, (void*)dqa})
      cudaFree(x);
  }
}

int main(int argc, char** argv) {
  cudaDeviceProp p;
  CHECK(cudaGetDeviceProperties(&p, 0));
  printf("device: %s\n", p.name);
  const bool profiling = argc > 1 && std::string(argv[1]) == "profile";
  for (const Kernel& kern : ALL_KERNELS) {
    bool named = false;
    for (int a = profiling ? 2 : 1; a < argc; ++a) named |= std::string(argv[a]) == kern.name;
    if (named || argc == (profiling ? 2 : 1)) KERNELS.push_back(kern);
  }
  if (KERNELS.empty()) {
    fprintf(stderr, "no kernel of that name; the kernels:");
    for (const Kernel& kern : ALL_KERNELS) fprintf(stderr, " '%s'", kern.name);
    fprintf(stderr, "\n");
    return 2;
  }
  if (profiling) {
    profile();
    return 0;
  }
  auto has = [](int d) {
    return std::any_of(KERNELS.begin(), KERNELS.end(), [d](const Kernel& k) { return k.d == d; });
  };
  bool ok = true;
  for (int d : {64, 128}) {
    if (!has(d)) continue;
    ok &= check(d, 2, 200, 200, false, false);
    ok &= check(d, 2, 200, 200, true, false);
    ok &= check(d, 2, 77, 333, false, false);
    ok &= check(d, 2, 77, 333, true, false);
    ok &= check(d, 1, 1, 1, false, false);
    ok &= check(d, 3, 1, 190, true, false);
    ok &= check(d, 2, 130, 65, false, false);
    ok &= check(d, 2, 256, 256, true, false);
    ok &= check(d, 4, 300, 300, true, true);
    ok &= check(d, 3, 512, 512, false, true);
    ok &= check(d, 2, 1000, 1000, true, false);
  }
  printf("correctness: %s\n", ok ? "all ok" : "FAILURES");
  if (getenv("PROBE_CHECK_ONLY")) return ok ? 0 : 1;  // e.g. under compute-sanitizer
  for (int d : {64, 128})
    for (bool causal : {false, true})
    for (int n : {1024, 2048, 4096, 8192, 16384}) {
      if (!has(d)) continue;
      const int bh = 262144 / n;
      const size_t ne = (size_t)bh * n * d;
      bf16 *q = rnd(ne, 11), *k = rnd(ne, 12), *v = rnd(ne, 13), *dO = rnd(ne, 14), *dk = dev<bf16>(ne),
           *dv = dev<bf16>(ne);
      float *L = dev<float>(bh * n), *Dm = dev<float>(bh * n), *dqa = dev<float>(ne);
      CHECK(cudaMemset(L, 0, bh * n * 4));
      CHECK(cudaMemset(Dm, 0, bh * n * 4));
      cudaEvent_t a, b;
      cudaEventCreate(&a);
      cudaEventCreate(&b);
      const size_t nk = KERNELS.size();
      std::vector<std::vector<float>> times(nk);
      std::vector<std::function<void()>> run(nk);
      for (size_t i = 0; i < nk; ++i)
        if (KERNELS[i].d == d) run[i] = prepared(KERNELS[i], q, k, v, dO, L, Dm, dqa, dk, dv, bh, n, n, causal, nullptr);
      for (int r = 0; r < 13; ++r)
        for (size_t i = 0; i < nk; ++i) {
          if (KERNELS[i].d != d) continue;
          float ms;
          cudaEventRecord(a);
          run[i]();
          cudaEventRecord(b);
          CHECK(cudaEventSynchronize(b));
          cudaEventElapsedTime(&ms, a, b);
          if (r >= 3) times[i].push_back(ms);
        }
      const double flops = 2.5 * 4.0 * bh * (double)n * n * d / (causal ? 2 : 1);
      size_t first = 0;
      while (KERNELS[first].d != d) ++first;
      const float base = median(times[first]);
      printf("time bwd d %d causal %d n %5d:", d, causal, n);
      for (size_t i = 0; i < nk; ++i) {
        if (KERNELS[i].d != d) continue;
        const float ms = median(times[i]);
        printf(" | %s %.3f ms %.0f TFLOP/s %.2fx", KERNELS[i].name, ms, flops / ms / 1e9, base / ms);
      }
      printf("\n");
      for (void* x : {(void*)q, (void*)k, (void*)v, (void*)dO, (void*)dk, (void*)dv, (void*)L, (void*)Dm, (void*)dqa})
        cudaFree(x);
    }
  return ok ? 0 : 1;
}
