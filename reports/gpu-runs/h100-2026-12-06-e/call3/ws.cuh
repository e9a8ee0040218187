// Warp-specialised variant (to be merged into flash_attn_hopper.cu): TMA loads by a producer
// warpgroup into NS-stage K and V rings guarded by mbarriers; two consumer warpgroups.
namespace hopper {

// A CUtensorMap (cuda.h), opaque: 128 bytes, 64-byte aligned, passed by value.
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
// One box of a 3-D tensor map (coordinates: column, row, head) into shared memory; completion
// counted in bytes on `bar`.
__device__ __forceinline__ void tma_load_3d(void* dst, const TensorMap* map, int c0, int c1, int c2, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
      : "memory");
}
// Rows [row0, row0 + ROWS) of head bh, all D columns, as D/64 boxes of 64 columns: the panels.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void tma_tile(T* s, const TensorMap* map, int row0, int bh, uint64_t* bar) {
#pragma unroll
  for (int p = 0; p < D / 64; ++p) tma_load_3d(s + p * ROWS * 64, map, p * 64, row0, bh, bar);
}

template <typename T, int D, int BC, int NS>
constexpr int ws_smem_bytes() {
  return (128 * D + 2 * NS * BC * D) * (int)sizeof(T) + 1024 + 8 * (1 + 4 * NS);
}

template <typename T, int D, int BC, int NS>
__device__ __forceinline__ void fwd_wgmma_ws(const TensorMap* tmQ, const TensorMap* tmK, const TensorMap* tmV,
                                             T* __restrict__ O, float* __restrict__ LSE, int n_q, int n_k,
                                             float scale_log2, int causal, const int* __restrict__ kv_len) {
  constexpr int BR = 128, TILE = BC * D, TILE_BYTES = TILE * (int)sizeof(T);
  extern __shared__ unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023));
  T* sK = sQ + BR * D;       // NS stages of BC × D
  T* sV = sK + NS * TILE;    // NS stages of BC × D
  uint64_t* bars = reinterpret_cast<uint64_t*>(sV + NS * TILE);
  uint64_t* q_full = bars;
  uint64_t* k_full = bars + 1;
  uint64_t* k_empty = k_full + NS;
  uint64_t* v_full = k_empty + NS;
  uint64_t* v_empty = v_full + NS;

  const int tid = threadIdx.x, wg = tid >> 7;
  const int bh = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const int kv_end = causal ? min(n_kr, q0 + BR + offset) : n_kr;
  const int n_tiles = max(1, (kv_end + BC - 1) / BC);

  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < NS; ++s) {
      mbar_init(k_full + s, 1);
      mbar_init(v_full + s, 1);
      mbar_init(k_empty + s, 256);
      mbar_init(v_empty + s, 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // Producer: one thread issues every load; the others of the warpgroup have nothing to do.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (tid == 0) {
      mbar_expect_tx(q_full, BR * D * sizeof(T));
      tma_tile<T, D, BR>(sQ, tmQ, q0, bh, q_full);
      for (int j = 0; j < n_tiles; ++j) {
        const int s = j % NS;
        const uint32_t phase = (j / NS) & 1;
        if (j >= NS) mbar_wait(k_empty + s, phase ^ 1);
        mbar_expect_tx(k_full + s, TILE_BYTES);
        tma_tile<T, D, BC>(sK + s * TILE, tmK, j * BC, bh, k_full + s);
        if (j >= NS) mbar_wait(v_empty + s, phase ^ 1);
        mbar_expect_tx(v_full + s, TILE_BYTES);
        tma_tile<T, D, BC>(sV + s * TILE, tmV, j * BC, bh, v_full + s);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  // Consumers: warpgroup c = wg - 1 owns query rows 64c..64c+63.
  const int c = wg - 1, ctid = tid - 128, warp = (ctid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t q_base = smem_u32(sQ) + c * 64 * 128;
  const uint32_t k_base = smem_u32(sK), v_base = smem_u32(sV);
  const int row_w0 = q0 + c * 64 + warp * 16;

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {neg_inf(), neg_inf()};
  float l_r[2] = {0.f, 0.f};
  float alpha[2];
  float s[BC / 8][4];
  uint32_t p[BC / 16][4];

  mbar_wait(q_full, 0);
  mbar_wait(k_full, 0);
  wgmma_fence();
  issue_scores<T, D, BC, BR>(s, q_base, k_base);
  wgmma_commit();
  wgmma_wait<0>();
  pin(s);
  mbar_arrive(k_empty);
  mask_tile<BC>(s, 0, row_w0, g, t, n_kr, causal, offset);
  softmax_tile<BC>(s, m_r, l_r, alpha, scale_log2);
  pack_p<T, BC>(p, s);

  for (int j = 1; j < n_tiles; ++j) {
    const int sj = j % NS, sp = (j - 1) % NS;
    mbar_wait(k_full + sj, (j / NS) & 1);
    wgmma_fence();
    issue_scores<T, D, BC, BR>(s, q_base, k_base + sj * TILE_BYTES);
    wgmma_commit();
    mbar_wait(v_full + sp, ((j - 1) / NS) & 1);
    issue_pv<T, D, BC>(o, p, v_base + sp * TILE_BYTES);
    wgmma_commit();

    wgmma_wait<1>();
    pin(s);
    mbar_arrive(k_empty + sj);
    mask_tile<BC>(s, j * BC, row_w0, g, t, n_kr, causal, offset);
    softmax_tile<BC>(s, m_r, l_r, alpha, scale_log2);

    wgmma_wait<0>();
    pin(o);
    pin(p);
    mbar_arrive(v_empty + sp);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= alpha[0];
      o[dn][1] *= alpha[0];
      o[dn][2] *= alpha[1];
      o[dn][3] *= alpha[1];
    }
    pack_p<T, BC>(p, s);
  }
  {
    const int sp = (n_tiles - 1) % NS;
    mbar_wait(v_full + sp, ((n_tiles - 1) / NS) & 1);
    wgmma_fence();
    issue_pv<T, D, BC>(o, p, v_base + sp * TILE_BYTES);
    wgmma_commit();
    wgmma_wait<0>();
    pin(o);
    pin(p);
    mbar_arrive(v_empty + sp);
  }

  // Epilogue: this warpgroup's rows of O through its rows of sQ (only it read them), L = m + ln l.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_r[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_r[r] = l;
    inv[r] = l > 0.f ? 1.f / l : 0.f;
  }
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = c * 64 + warp * 16 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(sQ + panel_offset<BR>(row, dn * 8 + 2 * t)) =
          Ops<T>::pack2(o[dn][2 * r] * inv[r], o[dn][2 * r + 1] * inv[r]);
    }
  }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_w0 + g + 8 * r;
      if (row < n_q)
        LSE[(size_t)bh * n_q + row] =
            (m_r[r] == neg_inf()) ? neg_inf() : (m_r[r] * scale_log2 + log2f(l_r[r])) * LN2;
    }
  }
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");  // this warpgroup's rows are staged
  constexpr int CH = D / 8;
#pragma unroll
  for (int it = 0; it < 64 * CH / 128; ++it) {
    const int idx = it * 128 + (ctid & 127);
    const int r = c * 64 + idx / CH, col = idx % CH;
    const int gr = q0 + r;
    if (gr < n_q)
      *reinterpret_cast<uint4*>(O + ((size_t)bh * n_q + gr) * D + col * 8) =
          *reinterpret_cast<const uint4*>(sQ + panel_offset<BR>(r, col * 8));
  }
}

}  // namespace hopper

#define FWD_WGMMA_WS(NAME, T, D, BC, NS)                                                                     \
  extern "C" __global__ void __launch_bounds__(384, 1)                                                      \
      NAME(const __grid_constant__ hopper::TensorMap tmQ, const __grid_constant__ hopper::TensorMap tmK,    \
           const __grid_constant__ hopper::TensorMap tmV, T* O, float* LSE, int n_q, int n_k, int d,         \
           float scale_log2, int causal, const int* kv_len) {                                               \
    hopper::fwd_wgmma_ws<T, D, BC, NS>(&tmQ, &tmK, &tmV, O, LSE, n_q, n_k, scale_log2, causal, kv_len);     \
  }
