// Decode attention over the KV cache: GQA with split-K (flash-decoding) and a merge, BF16 or
// FP8 KV, sliding window through the [t0, t1) range; and DeepSeek's absorbed MLA.
//
// Stable ABI (extern "C"; pointers are device pointers; KV caches hold format codes: uint16 bf16
// bits, or uint8 E4M3 / E5M2 codes whose value is decode(code) * kv_scale):
//
//   tpj_gqa_decode_d{64,128,256}_g{1,2,4,8}_{bf16,e4m3,e5m2}(
//       const float* q, const void* k_cache, const void* v_cache, float kv_scale,
//       int Hq, int Hkv, int Lmax, int t0, int t1, int chunk, float sm_scale,
//       float* out, float* part_acc, float* part_ml)
//     grid (splits, Hq / g, B), block 128. q: (B, Hq, D) float, RoPE applied. Caches
//     (B, Hkv, Lmax, D). Query head h reads KV head h / (Hq / Hkv); block (s, hg, b) handles
//     query heads hg*g .. hg*g+g-1 over positions [t0 + s*chunk, min(t1, t0 + (s+1)*chunk)).
//     With splits == 1 it writes out (B, Hq, D) = softmax(q.K * sm_scale) V directly; otherwise
//     part_acc (B, Hq, splits, D) holds unnormalised partial sums and part_ml (B, Hq, splits, 2)
//     their (max, sum) in the log2 domain (see tpj_softmax.cuh), for tpj_attn_merge.
//   tpj_mla_decode_r{64,512}_p{16,64}_{bf16,e4m3,e5m2}(
//       const float* q_latent, const float* q_rope, const void* ckv_cache,
//       const void* krope_cache, float kv_scale, int H, int Lmax, int t1, int chunk,
//       float sm_scale, float* out, float* part_acc, float* part_ml)
//     grid (splits, ceil(H / 8), B), block 256 (one warp a head). q_latent (B, H, R), q_rope
//     (B, H, P) float; ckv_cache (B, Lmax, R), krope_cache (B, Lmax, P). score(h, t) =
//     (q_latent[h] . ckv[t] + q_rope[h] . krope[t]) * sm_scale over t in [0, t1); output the
//     softmax-weighted sum of ckv rows (B, H, R), or partials as above with D = R.
//   tpj_attn_merge(const float* part_acc, const float* part_ml, int splits, int D, float* out)
//     grid (rows), block 128: out[r, :] = merge of the `splits` partial states of row r
//     (rows = B * heads; out is (rows, D)).
#include "tpj_device.cuh"
#include "tpj_softmax.cuh"

#define KV_BF16 0
#define KV_E4M3 1
#define KV_E5M2 2
#define ATT_THREADS 128
#define MAX_SPLITS 256

// Eight consecutive KV elements starting at element `idx` of a cache, decoded to float and
// multiplied by kv_scale (bf16 caches have scale 1 and ignore it).
template <int KV>
__device__ __forceinline__ void load_kv8(const void* cache, size_t idx, float kv_scale,
                                         float (&out)[8]) {
  if (KV == KV_BF16) {
    const uint4 u = tpj_ldg16(static_cast<const uint16_t*>(cache) + idx);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = tpj_bf16x2_to_float2(w[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else {
    const uint2 u = tpj_ldg8(static_cast<const uint8_t*>(cache) + idx);
    const uint32_t w[2] = {u.x, u.y};
    const float f = KV == KV_E4M3 ? kv_scale * TPJ_E4M3_HALF_FACTOR : kv_scale;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t hw = KV == KV_E4M3 ? tpj_e4m3x2_to_half2_scaled(w[i], h)
                                          : tpj_e5m2x2_to_half2(w[i], h);
        const float2 v = tpj_half2_to_float2(hw);
        out[4 * i + 2 * h] = v.x * f;
        out[4 * i + 2 * h + 1] = v.y * f;
      }
    }
  }
}

// GQA split-K decode. Each lane owns 8 of the D dimensions of one KV row; LPR = D / 8 lanes
// form a row group, and each row group keeps its own online-softmax state for the G query
// heads of the block over the rows it visits; the block's row groups merge at the end.
template <int D, int G, int KV>
__device__ __forceinline__ void gqa_decode(const float* __restrict__ q, const void* k_cache,
                                           const void* v_cache, float kv_scale, int Hq, int Hkv,
                                           int Lmax, int t0, int t1, int chunk, float sm_scale,
                                           float* out, float* part_acc, float* part_ml) {
  constexpr int LPR = D / 8;
  constexpr int RPW = 32 / LPR;              // rows a warp handles at once
  constexpr int NRG = (ATT_THREADS / 32) * RPW;  // row groups in the block
  __shared__ float s_acc[NRG][G][D];
  __shared__ float s_m[NRG][G], s_l[NRG][G];

  const int split = blockIdx.x, hg = blockIdx.y, b = blockIdx.z;
  const int splits = gridDim.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rg = warp * RPW + lane / LPR;  // row group of this lane (rows rg, rg + NRG, ...)
  const int part = lane % LPR;             // which 8 dims
  const int h0 = hg * G;                   // first query head of the block
  const int kvh = h0 / (Hq / Hkv);
  const int lo = t0 + split * chunk;
  const int hi = min(t1, lo + chunk);

  const float qscale = sm_scale * TPJ_LOG2E;
  float qr[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float* qp = q + ((size_t)b * Hq + h0 + g) * D + part * 8;
    const float4 a = *reinterpret_cast<const float4*>(qp);
    const float4 c = *reinterpret_cast<const float4*>(qp + 4);
    qr[g][0] = a.x * qscale; qr[g][1] = a.y * qscale; qr[g][2] = a.z * qscale;
    qr[g][3] = a.w * qscale; qr[g][4] = c.x * qscale; qr[g][5] = c.y * qscale;
    qr[g][6] = c.z * qscale; qr[g][7] = c.w * qscale;
  }
  float acc[G][8], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = tpj_neg_inf();
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
  }

  const size_t head_base = ((size_t)b * Hkv + kvh) * Lmax;
  // The loop runs the same number of times on every lane of a warp (the shuffles below need
  // the whole warp); a row group whose row is past the end feeds a score of -inf.
  const int sub = lane / LPR;  // row group inside the warp
  for (int base = lo + warp * RPW; base < hi; base += 2 * NRG) {
    const int t = base + sub, t2 = t + NRG;
    const bool ok1 = t < hi, ok2 = t2 < hi;
    float k1[8], v1[8], k2[8], v2[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) k1[i] = v1[i] = k2[i] = v2[i] = 0.0f;
    if (ok1) {
      load_kv8<KV>(k_cache, (head_base + t) * D + part * 8, kv_scale, k1);
      load_kv8<KV>(v_cache, (head_base + t) * D + part * 8, kv_scale, v1);
    }
    if (ok2) {
      load_kv8<KV>(k_cache, (head_base + t2) * D + part * 8, kv_scale, k2);
      load_kv8<KV>(v_cache, (head_base + t2) * D + part * 8, kv_scale, v2);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s1 = fmaf(qr[g][i], k1[i], s1);
        s2 = fmaf(qr[g][i], k2[i], s2);
      }
#pragma unroll
      for (int o = LPR / 2; o > 0; o >>= 1) {
        s1 += __shfl_xor_sync(0xffffffffu, s1, o);
        s2 += __shfl_xor_sync(0xffffffffu, s2, o);
      }
      const float sc[2] = {ok1 ? s1 : tpj_neg_inf(), ok2 ? s2 : tpj_neg_inf()};
      float p[2];
      const float corr = tpj_softmax_fold<2>(m[g], l[g], sc, p);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(acc[g][i], corr, fmaf(p[0], v1[i], p[1] * v2[i]));
    }
  }

  // Merge the row groups of the block.
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) s_acc[rg][g][part * 8 + i] = acc[g][i];
    if (part == 0) {
      s_m[rg][g] = m[g];
      s_l[rg][g] = l[g];
    }
  }
  __syncthreads();
  for (int o = threadIdx.x; o < G * D; o += ATT_THREADS) {
    const int g = o / D, d = o % D;
    float mx = tpj_neg_inf();
#pragma unroll
    for (int r = 0; r < NRG; ++r) mx = fmaxf(mx, s_m[r][g]);
    float lsum = 0.0f, a = 0.0f;
#pragma unroll
    for (int r = 0; r < NRG; ++r) {
      const float c = tpj_rescale(s_m[r][g], mx);
      lsum = fmaf(s_l[r][g], c, lsum);
      a = fmaf(s_acc[r][g][d], c, a);
    }
    const int hq = h0 + g;
    if (splits == 1) {
      out[((size_t)b * Hq + hq) * D + d] = a / lsum;
    } else {
      const size_t row = (size_t)b * Hq + hq;
      part_acc[(row * splits + split) * D + d] = a;
      if (d == 0) {
        part_ml[(row * splits + split) * 2] = mx;
        part_ml[(row * splits + split) * 2 + 1] = lsum;
      }
    }
  }
}

#define GQA_ENTRY(DD, GG, KVN, KVK)                                                          \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1)                                  \
      tpj_gqa_decode_d##DD##_g##GG##_##KVN(                                                  \
          const float* q, const void* k_cache, const void* v_cache, float kv_scale, int Hq,  \
          int Hkv, int Lmax, int t0, int t1, int chunk, float sm_scale, float* out,          \
          float* part_acc, float* part_ml) {                                                 \
    gqa_decode<DD, GG, KVK>(q, k_cache, v_cache, kv_scale, Hq, Hkv, Lmax, t0, t1, chunk,     \
                            sm_scale, out, part_acc, part_ml);                               \
  }

#define GQA_KV(DD, GG)                \
  GQA_ENTRY(DD, GG, bf16, KV_BF16)    \
  GQA_ENTRY(DD, GG, e4m3, KV_E4M3)    \
  GQA_ENTRY(DD, GG, e5m2, KV_E5M2)

#define GQA_G(DD) GQA_KV(DD, 1) GQA_KV(DD, 2) GQA_KV(DD, 4) GQA_KV(DD, 8)

GQA_G(64)
GQA_G(128)
GQA_G(256)

// ------------------------------------------------------------------------------------- MLA

#define MLA_THREADS 256
#define MLA_HEADS 8  // one warp a head
#define MLA_CHUNK 16

template <int KV>
__device__ __forceinline__ void load_span(const void* cache, size_t first, int n, float kv_scale,
                                          float* dst) {
  // n is a multiple of 8 and first is 8-aligned: 8 elements a thread at a time.
  for (int i = threadIdx.x * 8; i < n; i += MLA_THREADS * 8) {
    float v[8];
    load_kv8<KV>(cache, first + i, kv_scale, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) dst[i + j] = v[j];
  }
}

template <int R, int P, int KV>
__device__ __forceinline__ void mla_decode(const float* __restrict__ q_latent,
                                           const float* __restrict__ q_rope,
                                           const void* ckv_cache, const void* krope_cache,
                                           float kv_scale, int H, int Lmax, int t1, int chunk,
                                           float sm_scale, float* out, float* part_acc,
                                           float* part_ml) {
  constexpr int RJ = R / 32;
  constexpr int PJ = (P + 31) / 32;
  __shared__ float s_c[MLA_CHUNK * R];
  __shared__ float s_r[MLA_CHUNK * P];
  const int split = blockIdx.x, b = blockIdx.z;
  const int splits = gridDim.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.y * MLA_HEADS + warp;
  const bool active = h < H;
  const int lo = split * chunk;
  const int hi = min(t1, lo + chunk);

  const float qscale = sm_scale * TPJ_LOG2E;
  float ql[RJ], qp[PJ], acc[RJ];
#pragma unroll
  for (int j = 0; j < RJ; ++j) {
    ql[j] = active ? q_latent[((size_t)b * H + h) * R + lane + 32 * j] * qscale : 0.0f;
    acc[j] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < PJ; ++j) {
    const int d = lane + 32 * j;
    qp[j] = (active && d < P) ? q_rope[((size_t)b * H + h) * P + d] * qscale : 0.0f;
  }
  float m = tpj_neg_inf(), l = 0.0f;
  for (int c0 = lo; c0 < hi; c0 += MLA_CHUNK) {
    const int n = min(MLA_CHUNK, hi - c0);
    __syncthreads();  // the previous chunk is consumed
    load_span<KV>(ckv_cache, ((size_t)b * Lmax + c0) * R, n * R, kv_scale, s_c);
    load_span<KV>(krope_cache, ((size_t)b * Lmax + c0) * P, n * P, kv_scale, s_r);
    __syncthreads();
    float sc[MLA_CHUNK], p[MLA_CHUNK];
#pragma unroll
    for (int t = 0; t < MLA_CHUNK; ++t) {
      float s = 0.0f;
      if (t < n) {
#pragma unroll
        for (int j = 0; j < RJ; ++j) s = fmaf(ql[j], s_c[t * R + lane + 32 * j], s);
#pragma unroll
        for (int j = 0; j < PJ; ++j) {
          const int d = lane + 32 * j;
          if (d < P) s = fmaf(qp[j], s_r[t * P + d], s);
        }
      }
      s = tpj_warp_sum(s);
      sc[t] = t < n ? s : tpj_neg_inf();
    }
    const float corr = tpj_softmax_fold<MLA_CHUNK>(m, l, sc, p);
#pragma unroll
    for (int j = 0; j < RJ; ++j) {
      float a = acc[j] * corr;
#pragma unroll
      for (int t = 0; t < MLA_CHUNK; ++t)
        if (t < n) a = fmaf(p[t], s_c[t * R + lane + 32 * j], a);
      acc[j] = a;
    }
  }
  if (!active) return;
  const size_t row = (size_t)b * H + h;
#pragma unroll
  for (int j = 0; j < RJ; ++j) {
    const int d = lane + 32 * j;
    if (splits == 1) {
      out[row * R + d] = acc[j] / l;
    } else {
      part_acc[(row * splits + split) * R + d] = acc[j];
    }
  }
  if (splits > 1 && lane == 0) {
    part_ml[(row * splits + split) * 2] = m;
    part_ml[(row * splits + split) * 2 + 1] = l;
  }
}

#define MLA_ENTRY(RR, PP, KVN, KVK)                                                          \
  extern "C" __global__ void __launch_bounds__(MLA_THREADS, 1)                                  \
      tpj_mla_decode_r##RR##_p##PP##_##KVN(                                                  \
          const float* q_latent, const float* q_rope, const void* ckv_cache,                \
          const void* krope_cache, float kv_scale, int H, int Lmax, int t1, int chunk,       \
          float sm_scale, float* out, float* part_acc, float* part_ml) {                     \
    mla_decode<RR, PP, KVK>(q_latent, q_rope, ckv_cache, krope_cache, kv_scale, H, Lmax, t1, \
                            chunk, sm_scale, out, part_acc, part_ml);                        \
  }

#define MLA_KV(RR, PP)               \
  MLA_ENTRY(RR, PP, bf16, KV_BF16)   \
  MLA_ENTRY(RR, PP, e4m3, KV_E4M3)   \
  MLA_ENTRY(RR, PP, e5m2, KV_E5M2)

MLA_KV(64, 16)
MLA_KV(512, 64)

// ----------------------------------------------------------------------------------- merge

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1)
    tpj_attn_merge(const float* part_acc, const float* part_ml, int splits, int D, float* out) {
  __shared__ float w[MAX_SPLITS];
  const size_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    const float* ml = part_ml + row * splits * 2;
    tpj_merge_weights(ml, ml + 1, splits, 2, w);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < splits; ++s) a = fmaf(w[s], part_acc[(row * splits + s) * D + d], a);
    out[row * D + d] = a;
  }
}
