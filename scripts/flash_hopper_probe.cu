// A standalone probe of 8-09's Hopper forward kernel (kernels/flash_attn_hopper.cu), without
// Candle: correctness on ragged shapes (O and L against a plain fp32 reference kernel below) and
// forward TFLOP/s of the shipped kernels and their variants at the benchmark's shapes (262,144 tokens per call). For fast
// iteration on the kernel; the numbers a report quotes come from `t0809_flash_attention bench`.
//
// Build (here, no GPU needed; one translation unit, so setmaxnreg is honoured):
//   nvcc -O3 -std=c++17 --use_fast_math -gencode arch=compute_90a,code=sm_90a \
//        -o flash_hopper_probe scripts/flash_hopper_probe.cu
// Run on an H100/H200: ./flash_hopper_probe
// PROBE_CHECK_ONLY=1 stops after the correctness checks (for compute-sanitizer).

#include "../crates/t0809_flash_attention/kernels/flash_attn_hopper.cu"
#include "flash_hopper_probe_common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

typedef void (*Fwd)(const hopper::TensorMap, const hopper::TensorMap, const hopper::TensorMap, bf16*, float*, int, int,
                      int, float, int, const int*);
// The variants beside the shipped kernels: the d 64 kernels without turns at the tensor cores
// (fwd_wgmma's TURNS = false). Turns at d 128 measured 0.96–1.02× and were dropped
// (reports/gpu-runs/h100-2026-12-07-d/call2). Tile variants measured and dropped before (key
// tiles of 64, three stages with two consumers, three consumers with two stages) are in git up to
// 26c04db, their numbers in reports/gpu-runs (h200-2026-12-05-b and after).
FWD_WGMMA(no_turns_d64_nc2, bf16, 64, 128, 2, 2, false)
FWD_WGMMA(no_turns_d64_nc3, bf16, 64, 128, 3, 3, false)

struct Kernel {
  const char* name;
  Fwd fn;
  int smem, key_tile, consumers;
};

template <int D, int BC, int NS, int NC>
static Kernel ws(const char* name, Fwd fn) {
  return {name, fn, hopper::fwd_smem_bytes<bf16, D, BC, NS, NC>(), BC, NC};
}
static std::vector<Kernel> variants(int d) {
  if (d == 64)
    return {ws<64, 128, 2, 2>("shipped nc2", flash_fwd_wgmma_bf16_d64),
            ws<64, 128, 3, 3>("shipped nc3 s3", flash_fwd_wgmma3_bf16_d64),
            ws<64, 128, 2, 2>("no turns nc2", no_turns_d64_nc2), ws<64, 128, 3, 3>("no turns nc3 s3", no_turns_d64_nc3)};
  return {ws<128, 128, 2, 2>("shipped", flash_fwd_wgmma_bf16_d128)};
}

static void launch(const Kernel& k, const bf16* q, const bf16* kk, const bf16* v, bf16* o, float* l, int bh, int n_q,
                   int n_k, int d, bool causal, const int* kv_len) {
  CHECK(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem));
  const int rows = 64 * k.consumers;
  const hopper::TensorMap mq = make_map(q, d, n_q, bh, rows), mk = make_map(kk, d, n_k, bh, k.key_tile),
                          mv = make_map(v, d, n_k, bh, k.key_tile);
  dim3 grid((n_q + rows - 1) / rows, bh);
  k.fn<<<grid, 128 * (k.consumers + 1), k.smem>>>(mq, mk, mv, o, l, n_q, n_k, d, 1.4426950408889634f / sqrtf((float)d), causal ? 1 : 0,
                              kv_len);
  CHECK(cudaGetLastError());
}

static std::vector<bf16> random_bf16(size_t n, unsigned seed) {
  std::vector<bf16> h(n);
  srand(seed);
  for (size_t i = 0; i < n; ++i) h[i] = __float2bfloat16((rand() / (float)RAND_MAX) * 2.f - 1.f);
  return h;
}

// Max |a - b| over O and L of the two kernels on one shape; returns false past tolerance.
static bool compare(const Kernel& kern, int bh, int n_q, int n_k, int d, bool causal, bool padded) {
  const size_t nq = (size_t)bh * n_q * d, nk = (size_t)bh * n_k * d;
  auto hq = random_bf16(nq, 1), hk = random_bf16(nk, 2), hv = random_bf16(nk, 3);
  bf16 *q, *k, *v, *o1, *o2;
  float *l1, *l2;
  int* lens = nullptr;
  CHECK(cudaMalloc(&q, nq * 2));
  CHECK(cudaMalloc(&k, nk * 2));
  CHECK(cudaMalloc(&v, nk * 2));
  CHECK(cudaMalloc(&o1, nq * 4));  // the reference's O, f32
  CHECK(cudaMalloc(&o2, nq * 2));
  CHECK(cudaMalloc(&l1, bh * n_q * 4));
  CHECK(cudaMalloc(&l2, bh * n_q * 4));
  CHECK(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(k, hk.data(), nk * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
  if (padded) {
    std::vector<int> h(bh);
    for (int i = 0; i < bh; ++i) h[i] = (n_k * (i + 1)) / (bh + 1);  // 0 < len < n_k
    CHECK(cudaMalloc(&lens, bh * 4));
    CHECK(cudaMemcpy(lens, h.data(), bh * 4, cudaMemcpyHostToDevice));
  }
  reference_fwd<<<dim3((n_q + 127) / 128, bh), 128>>>(q, k, v, (float*)o1, l1, n_q, n_k, d, 1.f / sqrtf((float)d),
                                                    causal, lens);
  launch(kern, q, k, v, o2, l2, bh, n_q, n_k, d, causal, lens);
  CHECK(cudaDeviceSynchronize());
  std::vector<float> a(nq);
  std::vector<bf16> b(nq);
  std::vector<float> la(bh * n_q), lb(bh * n_q);
  CHECK(cudaMemcpy(a.data(), o1, nq * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), o2, nq * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(la.data(), l1, bh * n_q * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(lb.data(), l2, bh * n_q * 4, cudaMemcpyDeviceToHost));
  double eo = 0, el = 0, mo = 0;
  for (size_t i = 0; i < nq; ++i) {
    const double x = a[i], y = __bfloat162float(b[i]);
    eo = fmax(eo, fabs(x - y));
    mo = fmax(mo, fabs(x));
    if (std::isnan(y)) eo = INFINITY;
  }
  for (size_t i = 0; i < la.size(); ++i) {
    if (std::isinf(la[i]) && la[i] == lb[i]) continue;
    el = fmax(el, fabs((double)la[i] - lb[i]));
    if (std::isnan(lb[i])) el = INFINITY;
  }
  const bool ok = eo <= 2e-2 * fmax(mo, 1e-3) && el <= 1e-2;
  if (!ok)
    printf("FAIL %s: bh %d n_q %d n_k %d d %d causal %d padded %d: max|dO| %.3g (max|O| %.3g) max|dL| %.3g\n",
           kern.name, bh, n_q, n_k, d, causal, padded, eo, mo, el);
  cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(o1), cudaFree(o2), cudaFree(l1), cudaFree(l2);
  if (lens) cudaFree(lens);
  return ok;
}

static double time_ms(const Kernel& kern, int bh, int n, int d, bool causal) {
  const size_t ne = (size_t)bh * n * d;
  auto h = random_bf16(ne, 7);
  bf16 *q, *k, *v, *o;
  float* l;
  CHECK(cudaMalloc(&q, ne * 2));
  CHECK(cudaMalloc(&k, ne * 2));
  CHECK(cudaMalloc(&v, ne * 2));
  CHECK(cudaMalloc(&o, ne * 2));
  CHECK(cudaMalloc(&l, (size_t)bh * n * 4));
  CHECK(cudaMemcpy(q, h.data(), ne * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(k, h.data(), ne * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(v, h.data(), ne * 2, cudaMemcpyHostToDevice));
  for (int i = 0; i < 3; ++i) launch(kern, q, k, v, o, l, bh, n, n, d, causal, nullptr);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ts;
  for (int r = 0; r < 20; ++r) {
    cudaEventRecord(a);
    launch(kern, q, k, v, o, l, bh, n, n, d, causal, nullptr);
    cudaEventRecord(b);
    CHECK(cudaEventSynchronize(b));
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(o), cudaFree(l);
  return ts[ts.size() / 2];
}

int main() {
  cudaDeviceProp p;
  CHECK(cudaGetDeviceProperties(&p, 0));
  printf("device: %s (sm_%d%d)\n", p.name, p.major, p.minor);
  bool all_ok = true;
  for (int d : {64, 128})
    for (const Kernel& kern : variants(d)) {
      bool ok = true;
      ok &= compare(kern, 2, 200, 200, d, false, false);
      ok &= compare(kern, 2, 200, 200, d, true, false);
      ok &= compare(kern, 2, 77, 333, d, false, false);
      ok &= compare(kern, 2, 77, 333, d, true, false);
      ok &= compare(kern, 1, 1, 1, d, false, false);
      ok &= compare(kern, 3, 1, 190, d, true, false);
      ok &= compare(kern, 2, 130, 65, d, false, false);
      ok &= compare(kern, 2, 130, 65, d, true, false);
      ok &= compare(kern, 2, 256, 256, d, true, false);
      ok &= compare(kern, 4, 300, 300, d, true, true);
      ok &= compare(kern, 4, 1024, 1024, d, false, true);
      printf("check d %3d %-20s: %s\n", d, kern.name, ok ? "ok (11 shapes)" : "FAIL");
      all_ok &= ok;
    }
  printf("correctness: %s\n", all_ok ? "all ok" : "FAILURES");
  if (getenv("PROBE_CHECK_ONLY")) return all_ok ? 0 : 1;  // e.g. under compute-sanitizer
  for (int d : {64, 128})
    for (bool causal : {false, true})
      for (int n : {1024, 4096, 16384}) {
        const int bh = 262144 / n;
        const double flops = 4.0 * bh * (double)n * n * d / (causal ? 2 : 1);
        printf("time d %3d causal %d n %5d bh %3d:", d, causal, n, bh);
        for (const Kernel& kern : variants(d)) printf(" | %s %.0f", kern.name, flops / time_ms(kern, bh, n, d, causal) / 1e9);
        printf(" TFLOP/s\n");
      }
  return all_ok ? 0 : 1;
}
