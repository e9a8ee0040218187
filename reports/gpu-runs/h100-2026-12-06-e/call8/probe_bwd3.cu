// Probe of the Hopper backward: correctness against fp32 reference kernels, time against the
// mma.sync backward (loaded from the PTX the Rust build embeds).
#include "fah.cu"
#include "bwd3.cuh"
#include <cuda.h>
#include <cudaTypedefs.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); exit(1); } } while (0)
typedef __nv_bfloat16 bf16;
BWD_WGMMA(bwd_d64, bf16, 64, 2)
BWD_WGMMA(bwd_d128, bf16, 128, 2)

static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
static hopper::TensorMap make_map(const bf16* base, int d, int n, int bh, int rows) {
  if (!encode) { cudaDriverEntryPointQueryResult q; CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", (void**)&encode, cudaEnableDefault, &q)); }
  hopper::TensorMap m;
  cuuint64_t dims[3] = {(cuuint64_t)d, (cuuint64_t)n, (cuuint64_t)bh};
  cuuint64_t strides[2] = {(cuuint64_t)d * 2, (cuuint64_t)n * d * 2};
  cuuint32_t box[3] = {64, (cuuint32_t)rows, 1}, es[3] = {1, 1, 1};
  CUresult r = encode((CUtensorMap*)&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, (void*)base, dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) { fprintf(stderr, "encode failed %d\n", (int)r); exit(1); }
  return m;
}
__device__ bool visible(int i, int j, int n_q, int n_k, int n_kr, int causal) { return j < n_kr && !(causal && j > i + n_k - n_q); }
__device__ float dotb(const bf16* a, const bf16* b, int d) { float s = 0.f; for (int c = 0; c < d; ++c) s += __bfloat162float(a[c]) * __bfloat162float(b[c]); return s; }
// Forward reference: O (f32) and L, one thread per query.
__global__ void ref_fwd(const bf16* Q, const bf16* K, const bf16* V, float* O, float* L, int n_q, int n_k, int d, float scale, int causal, const int* kvl) {
  const int bh = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= n_q) return;
  const int n_kr = kvl ? min(n_k, kvl[bh]) : n_k; const bf16* q = Q + ((size_t)bh * n_q + i) * d;
  float m = -INFINITY; for (int j = 0; j < n_k; ++j) if (visible(i, j, n_q, n_k, n_kr, causal)) m = fmaxf(m, scale * dotb(q, K + ((size_t)bh * n_k + j) * d, d));
  float l = 0.f, o[128] = {0.f};
  for (int j = 0; j < n_k; ++j) { if (!visible(i, j, n_q, n_k, n_kr, causal)) continue; const float p = expf(scale * dotb(q, K + ((size_t)bh * n_k + j) * d, d) - m); l += p; for (int c = 0; c < d; ++c) o[c] += p * __bfloat162float(V[((size_t)bh * n_k + j) * d + c]); }
  for (int c = 0; c < d; ++c) O[((size_t)bh * n_q + i) * d + c] = l > 0.f ? o[c] / l : 0.f;
  L[(size_t)bh * n_q + i] = l > 0.f ? m + logf(l) : -INFINITY;
}
__global__ void ref_dot(const bf16* dO, const float* O, float* Dm, int rows, int d) { const int r = blockIdx.x * blockDim.x + threadIdx.x; if (r >= rows) return; float s = 0.f; for (int c = 0; c < d; ++c) s += __bfloat162float(dO[(size_t)r * d + c]) * O[(size_t)r * d + c]; Dm[r] = s; }
// dK, dV: one thread per key.
__global__ void ref_bwd_kv(const bf16* Q, const bf16* K, const bf16* V, const bf16* dO, const float* L, const float* Dm, float* dK, float* dV, int n_q, int n_k, int d, float scale, int causal, const int* kvl) {
  const int bh = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x; if (j >= n_k) return;
  const int n_kr = kvl ? min(n_k, kvl[bh]) : n_k; const bf16* k = K + ((size_t)bh * n_k + j) * d; const bf16* v = V + ((size_t)bh * n_k + j) * d;
  float dk[128] = {0.f}, dv[128] = {0.f};
  for (int i = 0; i < n_q; ++i) { if (!visible(i, j, n_q, n_k, n_kr, causal)) continue; const bf16* q = Q + ((size_t)bh * n_q + i) * d; const bf16* g = dO + ((size_t)bh * n_q + i) * d;
    const float p = expf(scale * dotb(q, k, d) - L[(size_t)bh * n_q + i]); const float ds = p * (dotb(g, v, d) - Dm[(size_t)bh * n_q + i]);
    for (int c = 0; c < d; ++c) { dv[c] += p * __bfloat162float(g[c]); dk[c] += ds * scale * __bfloat162float(q[c]); } }
  for (int c = 0; c < d; ++c) { dK[((size_t)bh * n_k + j) * d + c] = dk[c]; dV[((size_t)bh * n_k + j) * d + c] = dv[c]; }
}
__global__ void ref_bwd_q(const bf16* Q, const bf16* K, const bf16* V, const bf16* dO, const float* L, const float* Dm, float* dQ, int n_q, int n_k, int d, float scale, int causal, const int* kvl) {
  const int bh = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= n_q) return;
  const int n_kr = kvl ? min(n_k, kvl[bh]) : n_k; const bf16* q = Q + ((size_t)bh * n_q + i) * d; const bf16* g = dO + ((size_t)bh * n_q + i) * d;
  float dq[128] = {0.f};
  for (int j = 0; j < n_k; ++j) { if (!visible(i, j, n_q, n_k, n_kr, causal)) continue; const bf16* k = K + ((size_t)bh * n_k + j) * d;
    const float p = expf(scale * dotb(q, k, d) - L[(size_t)bh * n_q + i]); const float ds = p * (dotb(g, V + ((size_t)bh * n_k + j) * d, d) - Dm[(size_t)bh * n_q + i]);
    for (int c = 0; c < d; ++c) dq[c] += ds * scale * __bfloat162float(k[c]); }
  for (int c = 0; c < d; ++c) dQ[((size_t)bh * n_q + i) * d + c] = dq[c];
}
typedef void (*Bwd)(hopper::TensorMap, hopper::TensorMap, hopper::TensorMap, hopper::TensorMap, const float*, const float*, float*, bf16*, bf16*, int, int, int, float, float, int, const int*);
static void launch_ours(int d, const bf16* q, const bf16* k, const bf16* v, const bf16* dO, const float* L, const float* Dm, float* dQacc, bf16* dK, bf16* dV, int bh, int n_q, int n_k, bool causal, const int* kvl) {
  Bwd fn = d == 64 ? bwd_d64 : bwd_d128;
  const int smem = d == 64 ? hopper::bwd_smem_bytes<bf16, 64, 2>() : hopper::bwd_smem_bytes<bf16, 128, 2>();
  CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  hopper::TensorMap mq = make_map(q, d, n_q, bh, 64), mdo = make_map(dO, d, n_q, bh, 64), mk = make_map(k, d, n_k, bh, 128), mv = make_map(v, d, n_k, bh, 128);
  const float scale = 1.f / sqrtf((float)d);
  fn<<<dim3((n_k + 127) / 128, bh), 384, smem>>>(mq, mk, mv, mdo, L, Dm, dQacc, dK, dV, n_q, n_k, d, scale, scale * 1.4426950408889634f, causal, kvl);
  CHECK(cudaGetLastError());
}
static const void* jit(const char* name) {
  static cudaLibrary_t lib = nullptr;
  if (!lib) { FILE* f = fopen(".gpu/probe/flash_attn.ptx", "rb"); if (!f) { fprintf(stderr, "no ptx\n"); exit(1); } fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET); char* b = (char*)malloc(n + 1); fread(b, 1, n, f); b[n] = 0; fclose(f); CHECK(cudaLibraryLoadData(&lib, b, nullptr, nullptr, 0, nullptr, nullptr, 0)); }
  cudaKernel_t k; CHECK(cudaLibraryGetKernel(&k, lib, name)); return (const void*)k;
}
static void launch_tc(int d, const bf16* q, const bf16* k, const bf16* v, const bf16* dO, const float* L, const float* Dm, float* dQacc, bf16* dK, bf16* dV, int bh, int n_q, int n_k, bool causal) {
  const void* fn = jit(d == 64 ? "flash_bwd_tc_bf16_d64" : "flash_bwd_tc_bf16_d128");
  const int br = d <= 64 ? 64 : 32, smem = (2 * 128 * d + 2 * br * d + 128 * (br + 8)) * 2 + 2 * br * 4;
  CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  float scale = 1.f / sqrtf((float)d), sl2 = scale * 1.4426950408889634f; int ci = causal, di = d; const int* kvl = nullptr;
  void* args[] = {&q, &k, &v, &dO, &L, &Dm, &dQacc, &dK, &dV, &n_q, &n_k, &di, &scale, &sl2, &ci, &kvl};
  CHECK(cudaLaunchKernel(fn, dim3((n_k + 127) / 128, bh), dim3(256), args, smem, 0));
}
template <typename X> X* dev(size_t n) { X* p; CHECK(cudaMalloc(&p, n * sizeof(X))); return p; }
static bf16* rnd(size_t n, unsigned seed) { std::vector<bf16> h(n); srand(seed); for (auto& x : h) x = __float2bfloat16((rand() / (float)RAND_MAX) * 2.f - 1.f); bf16* p = dev<bf16>(n); CHECK(cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice)); return p; }
static std::vector<float> f32(const float* p, size_t n) { std::vector<float> h(n); CHECK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost)); return h; }
static std::vector<float> b16(const bf16* p, size_t n) { std::vector<bf16> h(n); CHECK(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost)); std::vector<float> o(n); for (size_t i = 0; i < n; ++i) o[i] = __bfloat162float(h[i]); return o; }
static double err(const std::vector<float>& a, const std::vector<float>& b, double* mx) { double e = 0, m = 0; for (size_t i = 0; i < a.size(); ++i) { e = std::isnan(a[i]) ? INFINITY : fmax(e, fabs(a[i] - b[i])); m = fmax(m, fabs(b[i])); } *mx = m; return e; }
static bool check(int bh, int n_q, int n_k, int d, bool causal, bool padded) {
  const size_t nq = (size_t)bh * n_q * d, nk = (size_t)bh * n_k * d;
  bf16 *q = rnd(nq, 1), *k = rnd(nk, 2), *v = rnd(nk, 3), *dO = rnd(nq, 4);
  int* kvl = nullptr;
  if (padded) { std::vector<int> h(bh); for (int i = 0; i < bh; ++i) h[i] = std::max(1, (n_k * (i + 1)) / (bh + 1)); kvl = dev<int>(bh); CHECK(cudaMemcpy(kvl, h.data(), bh * 4, cudaMemcpyHostToDevice)); }
  float *O = dev<float>(nq), *L = dev<float>(bh * n_q), *Dm = dev<float>(bh * n_q), *rdq = dev<float>(nq), *rdk = dev<float>(nk), *rdv = dev<float>(nk), *dqa = dev<float>(nq);
  bf16 *dk = dev<bf16>(nk), *dv = dev<bf16>(nk);
  const float scale = 1.f / sqrtf((float)d);
  ref_fwd<<<dim3((n_q + 63) / 64, bh), 64>>>(q, k, v, O, L, n_q, n_k, d, scale, causal, kvl);
  ref_dot<<<(bh * n_q + 127) / 128, 128>>>(dO, O, Dm, bh * n_q, d);
  ref_bwd_kv<<<dim3((n_k + 63) / 64, bh), 64>>>(q, k, v, dO, L, Dm, rdk, rdv, n_q, n_k, d, scale, causal, kvl);
  ref_bwd_q<<<dim3((n_q + 63) / 64, bh), 64>>>(q, k, v, dO, L, Dm, rdq, n_q, n_k, d, scale, causal, kvl);
  CHECK(cudaMemset(dqa, 0, nq * 4));
  launch_ours(d, q, k, v, dO, L, Dm, dqa, dk, dv, bh, n_q, n_k, causal, kvl);
  CHECK(cudaDeviceSynchronize());
  auto a = f32(dqa, nq); for (auto& x : a) x *= scale;
  double m1, m2, m3; const double e1 = err(a, f32(rdq, nq), &m1), e2 = err(b16(dk, nk), f32(rdk, nk), &m2), e3 = err(b16(dv, nk), f32(rdv, nk), &m3);
  const bool ok = e1 <= 2e-2 * m1 + 1e-3 && e2 <= 2e-2 * m2 + 1e-3 && e3 <= 2e-2 * m3 + 1e-3;
  printf("check bh %d n_q %d n_k %d d %d causal %d padded %d: dQ %.2e/%.2e dK %.2e/%.2e dV %.2e/%.2e %s\n", bh, n_q, n_k, d, causal, padded, e1, m1, e2, m2, e3, m3, ok ? "ok" : "FAIL");
  return ok;
}
static float med(std::vector<float> t) { std::sort(t.begin(), t.end()); return t[t.size() / 2]; }
int main() {
  cudaDeviceProp p; CHECK(cudaGetDeviceProperties(&p, 0)); printf("device: %s\n", p.name);
  bool ok = true;
  for (int d : {64, 128}) {
    ok &= check(2, 200, 200, d, false, false); ok &= check(2, 200, 200, d, true, false);
    ok &= check(2, 77, 333, d, false, false); ok &= check(2, 77, 333, d, true, false);
    ok &= check(1, 1, 1, d, false, false); ok &= check(3, 1, 190, d, true, false);
    ok &= check(2, 130, 65, d, false, false); ok &= check(2, 256, 256, d, true, false);
    ok &= check(4, 300, 300, d, true, true); ok &= check(3, 512, 512, d, false, true);
  }
  printf("correctness: %s\n", ok ? "all ok" : "FAILURES");
  for (int d : {64, 128}) for (bool causal : {false, true}) for (int n : {4096, 16384}) {
    const int bh = 262144 / n; const size_t ne = (size_t)bh * n * d;
    bf16 *q = rnd(ne, 11), *k = rnd(ne, 12), *v = rnd(ne, 13), *dO = rnd(ne, 14), *dk = dev<bf16>(ne), *dv = dev<bf16>(ne);
    float *L = dev<float>(bh * n), *Dm = dev<float>(bh * n), *dqa = dev<float>(ne);
    CHECK(cudaMemset(L, 0, bh * n * 4)); CHECK(cudaMemset(Dm, 0, bh * n * 4));
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    std::vector<float> t1, t2;
    for (int r = 0; r < 13; ++r) {
      float ms;
      cudaEventRecord(a); launch_tc(d, q, k, v, dO, L, Dm, dqa, dk, dv, bh, n, n, causal); cudaEventRecord(b); CHECK(cudaEventSynchronize(b)); cudaEventElapsedTime(&ms, a, b); if (r >= 3) t1.push_back(ms);
      cudaEventRecord(a); launch_ours(d, q, k, v, dO, L, Dm, dqa, dk, dv, bh, n, n, causal, nullptr); cudaEventRecord(b); CHECK(cudaEventSynchronize(b)); cudaEventElapsedTime(&ms, a, b); if (r >= 3) t2.push_back(ms);
    }
    const double fl = 2.5 * 4.0 * bh * (double)n * n * d / (causal ? 2 : 1);
    printf("time bwd d %3d causal %d n %5d: mma.sync %.3f ms %.0f TFLOP/s | wgmma %.3f ms %.0f TFLOP/s | %.2fx\n", d, causal, n, med(t1), fl / med(t1) / 1e9, med(t2), fl / med(t2) / 1e9, med(t1) / med(t2));
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(dO); cudaFree(dk); cudaFree(dv); cudaFree(L); cudaFree(Dm); cudaFree(dqa);
  }
  return ok ? 0 : 1;
}
