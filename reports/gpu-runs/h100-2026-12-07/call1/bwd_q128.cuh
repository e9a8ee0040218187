// A candidate organisation of 8-09's d 64 Hopper backward, under measurement in
// scripts/flash_hopper_bwd_probe.cu (`flash_hopper_bwd_probe shipped q128`); not in the crate.
//
// FlashAttention-3's tiles: 128 keys per CTA (as the shipped kernel) but query tiles of 128, and
// the two consumer warpgroups split each tile by queries for the scores and by keys for the
// weight gradients:
//   * consumer w computes S_w = Q_w Kᵀ and dP_w = dO_w Vᵀ for its 64 queries against all 128
//     keys (one m64n128 wgmma per 16 columns of d: twice the N of the shipped kernel's Sᵀ, dPᵀ);
//     a query is a row, so each thread needs the L and D of 2 queries, not 32;
//   * P_w = exp(S_w − L) and dS_w = P_w∘(dP_w − D) go to shared memory (double-buffered); dQ_w =
//     dS_w K is issued at once from registers (dS_w is already wgmma's A layout) and added into
//     the f32 dQ buffer from its registers (red_dq), each consumer its own 64 queries;
//   * after one barrier of both consumers (P and dS of the tile complete), consumer w computes
//     dV_w += Pᵀ dO and dK_w += dSᵀ Q for its 64 keys over all 128 queries, both operands from
//     shared memory (Pᵀ, dSᵀ read MN-major: the columns of P are the keys).
// Per thread: S and dP 64 floats each, dK and dV 32 each, dQ 32, the packed dS 32 (never all at
// once: at most about 200 registers live, under the 240 setmaxnreg gives).
// Shared memory at NS = 2: K, V 32 KiB; Q, dO 64 KiB; P, dS 2 × 64 KiB: 230,440 bytes of the
// 232,448 a CTA may have.
#pragma once

namespace hopper {

template <typename T, int NS>
constexpr int bwd_q128_smem_bytes() {
  return (2 * 128 * 64 + 2 * NS * 128 * 64 + 2 * 2 * 128 * 128) * (int)sizeof(T) + 1024 + 8 * (1 + 2 * NS);
}

template <typename T, int NS>
struct BwdQ128Shared {
  T *k, *v, *q, *d_o, *p, *ds;
  uint64_t *kv_full, *q_full, *q_empty;
  __device__ __forceinline__ explicit BwdQ128Shared(unsigned char* raw) {
    k = reinterpret_cast<T*>(raw + ((1024 - (smem_u32(raw) & 1023)) & 1023));
    v = k + 128 * 64;
    q = v + 128 * 64;            // NS stages of 128 queries × 64
    d_o = q + NS * 128 * 64;     // NS stages of 128 queries × 64
    p = d_o + NS * 128 * 64;     // 2 buffers of 128 queries × 128 keys (two panels)
    ds = p + 2 * 128 * 128;      // 2 buffers of 128 queries × 128 keys
    kv_full = reinterpret_cast<uint64_t*>(ds + 2 * 128 * 128);
    q_full = kv_full + 1;
    q_empty = q_full + NS;
  }
  __device__ __forceinline__ void init_barriers() const {
    mbar_init(kv_full, 1);
    for (int s = 0; s < NS; ++s) {
      mbar_init(q_full + s, 1);
      mbar_init(q_empty + s, 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
};

// The producer (one thread): K and V once, then Q_i and dO_i of each 128-query tile, each as two
// boxes of 64 rows (the tensor maps' box), back to back: one 128-row panel.
template <typename T, int NS>
__device__ __forceinline__ void bwd_q128_producer(const BwdQ128Shared<T, NS>& sh, const TensorMap* tmQ,
                                                  const TensorMap* tmK, const TensorMap* tmV, const TensorMap* tmdO,
                                                  int k0, int bh, int qb_first, int n_qb) {
  constexpr int QT = 128 * 64;
  mbar_expect_tx(sh.kv_full, 2 * 128 * 64 * sizeof(T));
  tma_tile<T, 64, 128>(sh.k, tmK, k0, bh, sh.kv_full);
  tma_tile<T, 64, 128>(sh.v, tmV, k0, bh, sh.kv_full);
  for (int qb = qb_first, j = 0; qb < n_qb; ++qb, ++j) {
    const int s = j % NS;
    claim_stage<NS>(sh.q_full + s, sh.q_empty + s, j, 2 * QT * sizeof(T));
    for (int h = 0; h < 2; ++h) {
      tma_tile<T, 64, 64>(sh.q + s * QT + h * 64 * 64, tmQ, qb * 128 + h * 64, bh, sh.q_full + s);
      tma_tile<T, 64, 64>(sh.d_o + s * QT + h * 64 * 64, tmdO, qb * 128 + h * 64, bh, sh.q_full + s);
    }
  }
}

// Both consumers (256 threads, named barrier 3).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 3, 256;\n" ::: "memory"); }

// This thread's 2 rows x 64 columns of a 16-bit tile (rows row0 + g, + 8; columns 8n + 2t + {0, 1})
// from packed A-layout registers (pack_p's layout) into a 128-row panel tile.
template <typename T>
__device__ __forceinline__ void store_packed(T* tile, const uint32_t (&a)[8][4], int row0, int g, int t) {
#pragma unroll
  for (int n = 0; n < 16; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(tile + panel_offset<128>(row0 + g + 8 * r, n * 8 + 2 * t)) =
          a[n >> 1][(n & 1) * 2 + r];
}

// Issues acc = A·Bᵀ (64 rows of A × the 128 rows of B, over d 64; both K-major) as one group: S_w
// (A = Q_w, B = K) or dP_w (A = dO_w, B = V).
template <typename T>
__device__ __forceinline__ void issue_rows(float (&acc)[16][4], uint32_t a_rows, uint32_t b_all) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) Ops<T>::ss(acc, k_major<128>(a_rows, kk), k_major<128>(b_all, kk), kk > 0);
  wgmma_commit();
}

// PF = true: the next tile's S and dP are issued behind this tile's dV and dK products (once dQ
// has gone out: its registers are needed), so a consumer's tensor cores have work across the top of the loop; the
// queue is emptied at the top (waiting there for fewer than all would make the compiler serialise
// the wgmmas: it does not follow the groups across the loop's back edge).
template <typename T, int NS, bool PF = false>
__device__ __forceinline__ void bwd_q128(const TensorMap* tmQ, const TensorMap* tmK, const TensorMap* tmV,
                                         const TensorMap* tmdO, const float* __restrict__ LSE,
                                         const float* __restrict__ Dsum, float* __restrict__ dQacc,
                                         T* __restrict__ dK, T* __restrict__ dV, int n_q, int n_k, float scale,
                                         float scale_log2, int causal, const int* __restrict__ kv_len) {
  constexpr int BC = 128, BM = 128, QT = BM * 64;
  extern __shared__ unsigned char smem_raw[];
  const BwdQ128Shared<T, NS> sh(smem_raw);

  const int tid = threadIdx.x, wg = tid >> 7;
  const auto [bh, k0, offset, n_kr, qb_first, n_qb] = bwd_block<BC, BM>(n_q, n_k, causal, kv_len);
  if (tid == 0) sh.init_barriers();
  __syncthreads();
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (tid == 0) bwd_q128_producer<T, NS>(sh, tmQ, tmK, tmV, tmdO, k0, bh, qb_first, n_qb);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  const int w = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t k_all = smem_u32(sh.k), v_all = smem_u32(sh.v);
  const float* Lh = LSE + (size_t)bh * n_q;
  const float* Dh = Dsum + (size_t)bh * n_q;
  float* dQh = dQacc + (size_t)bh * n_q * 64;

  float dk[8][4], dv[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  float sc[16][4], dp[16][4];
  mbar_wait(sh.kv_full, 0);
  if constexpr (PF) {
    if (qb_first < n_qb) {
      mbar_wait(sh.q_full, 0);
      issue_rows<T>(sc, smem_u32(sh.q) + w * 64 * 128, k_all);
      issue_rows<T>(dp, smem_u32(sh.d_o) + w * 64 * 128, v_all);
    }
  }
  for (int qb = qb_first, j = 0; qb < n_qb; ++qb, ++j) {
    const int s = j % NS, i0 = qb * BM, b = j & 1;
    const int row_w0 = i0 + w * 64 + warp * 16;  // this warp's 16 queries
    const uint32_t q_s = smem_u32(sh.q + s * QT), do_s = smem_u32(sh.d_o + s * QT);
    T* p_b = sh.p + b * BM * BC;
    T* ds_b = sh.ds + b * BM * BC;

    float lq[2], dr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int q = row_w0 + g + 8 * r;
      lq[r] = q < n_q ? __ldg(Lh + q) * 1.4426950408889634f : 0.f;
      dr[r] = q < n_q ? __ldg(Dh + q) : 0.f;
    }

    // S_w = Q_w Kᵀ and dP_w = dO_w Vᵀ (64 queries × 128 keys), two groups: P while dP runs.
    if constexpr (PF) {
      wgmma_wait<0>();  // this tile's S and dP, queued behind the tile before
      pin(sc);
      pin(dp);
    } else {
      mbar_wait(sh.q_full + s, (j / NS) & 1);
      issue_rows<T>(sc, q_s + w * 64 * 128, k_all);
      issue_rows<T>(dp, do_s + w * 64 * 128, v_all);
      wgmma_wait<1>();
      pin(sc);
    }

    // P = exp2(S·scale·log2e − L·log2e), 0 where the (query, key) pair does not exist.
    const bool need_mask = (row_w0 + 16 > n_q) || (k0 + BC > n_kr) || (causal && (k0 + BC - 1 > row_w0 + offset));
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = exp2f(fmaf(sc[n][e], scale_log2, -lq[e >> 1]));
        if (need_mask) {
          const int key = k0 + n * 8 + 2 * t + (e & 1), q = row_w0 + g + ((e >> 1) << 3);
          if (q >= n_q || key >= n_kr || (causal && key > q + offset)) p = 0.f;
        }
        sc[n][e] = p;
      }
    uint32_t pa[8][4];
    pack_p<T, 128>(pa, sc);
    store_packed<T>(p_b, pa, w * 64 + warp * 16, g, t);

    // dS = P∘(dP − D): to shared memory for dK, and from registers into dQ_w = dS_w K at once.
    if constexpr (!PF) {
      wgmma_wait<0>();
      pin(dp);
    }
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[n][e] = sc[n][e] * (dp[n][e] - dr[e >> 1]);
    uint32_t da[8][4];
    pack_p<T, 128>(da, dp);
    store_packed<T>(ds_b, da, w * 64 + warp * 16, g, t);
    float dq[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[i][e] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) Ops<T>::rs(dq, da[kk], mn_major<BC>(k_all, kk));
    wgmma_commit();

    // Both consumers' P and dS are in buffer b (buffer b was last read by tile j − 2's products,
    // which both consumers waited for before the barrier of tile j − 1).
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    consumers_sync();
    const uint32_t p_w = smem_u32(p_b) + w * BM * 128, ds_w = smem_u32(ds_b) + w * BM * 128;  // panel w: keys 64w..
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) OpsT<T>::ss_tt(dv, mn_major<BM>(p_w, kk), mn_major<BM>(do_s, kk), 1);
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) OpsT<T>::ss_tt(dk, mn_major<BM>(ds_w, kk), mn_major<BM>(q_s, kk), 1);
    wgmma_commit();

    wgmma_wait<1>();  // dQ_w is done; dV and dK run on
    pin(dq);
    pin(da);
    red_dq<64>(dq, dQh, i0 + w * 64, n_q, warp, g, t);
    if constexpr (PF) {
      // The next tile's S and dP, queued behind dV and dK (after the last tile, K Kᵀ and V Vᵀ,
      // dropped: one shape of pipeline for the compiler).
      const bool more = qb + 1 < n_qb;
      const int s1 = (j + 1) % NS;
      if (more) mbar_wait(sh.q_full + s1, ((j + 1) / NS) & 1);
      issue_rows<T>(sc, more ? smem_u32(sh.q + s1 * QT) + w * 64 * 128 : k_all, k_all);
      issue_rows<T>(dp, more ? smem_u32(sh.d_o + s1 * QT) + w * 64 * 128 : v_all, v_all);
      wgmma_wait<2>();
    } else {
      wgmma_wait<0>();
    }
    pin(dv);
    pin(dk);
    mbar_arrive(sh.q_empty + s);  // Q_i and dO_i are free
  }
  if constexpr (PF) {
    wgmma_wait<0>();  // the dropped products
    pin(sc);
    pin(dp);
  }

  store_dk_dv<T, 64>(dK + (size_t)bh * n_k * 64, dV + (size_t)bh * n_k * 64, dk, dv, scale, k0 + w * 64 + warp * 16,
                     n_k, g, t);
}

}  // namespace hopper
