// Weight-streaming GEMV / skinny GEMM for small batches (up to 4 rows of x per pass), in every
// weight format: BF16, FP8 (E4M3, E5M2) with a per-tensor scale, MXFP4 and NVFP4. The weights
// are read once, 16 bytes per lane per load, coalesced across the warp, and decoded in
// registers (FP8 and FP4 through the half bit tricks of tpj_codecs.cuh); block scales are
// applied once per block of 32 (MXFP4) or 16 (NVFP4) elements; accumulation is float32. It is
// how FP4 and FP8 weights run with BF16 activations on GPUs without FP4 (or FP8) tensor cores.
//
// Stable ABI (extern "C"; device pointers; `ll` is long long):
//   tpj_gemv_{bf16,e4m3,e5m2,mxfp4,nvfp4}_m{1,2,4}(
//       const uint8_t* w, ll w_expert_bytes, const uint8_t* ws, ll ws_expert_bytes,
//       const float* w_scale, const uint16_t* x, ll x_stride, const float* x_row_scale,
//       const int* groups, const int* x_rows, const int* y_rows, float* y, ll y_stride,
//       int N, int K, int M)
//   y[row, n] = w_scale[e] * x_row_scale[xr] * sum_k x[xr, k] * W_e[n, k]
//   W_e is expert e's (N, K) weight in the packed layout of engine/formats.py at
//   w + e * w_expert_bytes (block scales at ws + e * ws_expert_bytes, row-major (N, K / 32) or
//   (N, K / 16)); w_scale (nullable: 1) is the FP8 per-tensor scale or the NVFP4 global scale,
//   one float per expert. x holds bf16 rows of x_stride elements; x_row_scale is nullable.
//   Grouping: groups == null means one group (expert 0, slots 0..M-1); otherwise group
//   blockIdx.y is (expert, first slot, slot count) = groups[3 * blockIdx.y .. + 2] and a count
//   of 0 leaves the block idle. Slot s reads x row x_rows[s] (null: s) and writes y row
//   y_rows[s] (null: s), y rows y_stride floats apart. Groups with more than m slots are
//   processed m at a time (the weights are re-read from L2 for each pass).
//   grid (ceil(N / 16), groups or 1), block 128. Requires K * bits / 8 and x_stride * 2 to be
//   multiples of 16 bytes, and K % 32 == 0 for the FP4 formats.
#include "tpj_device.cuh"

#define W_BF16 0
#define W_E4M3 1
#define W_E5M2 2
#define W_MXFP4 3
#define W_NVFP4 4

#define GEMV_THREADS 128
#define GEMV_R 4  // weight rows per warp
#define GEMV_ROWS (GEMV_THREADS / 32 * GEMV_R)

template <int FMT>
struct WFmt {
  // elements per 16-byte chunk, and the power of two the decoded values carry (E4M3: 2^-8,
  // FP4: 2^-14)
  static constexpr int E = FMT == W_BF16 ? 8 : (FMT == W_E4M3 || FMT == W_E5M2) ? 16 : 32;
  static constexpr float DECODE_FACTOR =
      FMT == W_E4M3 ? TPJ_E4M3_HALF_FACTOR : (FMT >= W_MXFP4 ? TPJ_E2M1_HALF_FACTOR : 1.0f);
};

// Eight consecutive bf16 of x starting at element k, as floats.
__device__ __forceinline__ void load_x8(const uint16_t* xr, int k, float* out) {
  const uint4 u = tpj_ldg16(xr + k);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = tpj_bf16x2_to_float2(w[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Dot product of one 32-bit word of weights (2, 4 or 8 elements) with the matching x values.
template <int FMT>
__device__ __forceinline__ float word_dot(uint32_t w, const float* xv) {
  if (FMT == W_BF16) {
    const float2 f = tpj_bf16x2_to_float2(w);
    return fmaf(f.x, xv[0], f.y * xv[1]);
  } else if (FMT == W_E4M3 || FMT == W_E5M2) {
    const float2 a = tpj_half2_to_float2(FMT == W_E4M3 ? tpj_e4m3x2_to_half2_scaled(w, 0)
                                                       : tpj_e5m2x2_to_half2(w, 0));
    const float2 b = tpj_half2_to_float2(FMT == W_E4M3 ? tpj_e4m3x2_to_half2_scaled(w, 1)
                                                       : tpj_e5m2x2_to_half2(w, 1));
    return fmaf(a.x, xv[0], fmaf(a.y, xv[1], fmaf(b.x, xv[2], b.y * xv[3])));
  } else {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 h = tpj_half2_to_float2(tpj_e2m1x2_to_half2_scaled(w, j));
      s = fmaf(h.x, xv[j], fmaf(h.y, xv[j + 4], s));
    }
    return s;
  }
}

template <int FMT, int MT>
__device__ __forceinline__ void gemv(const uint8_t* __restrict__ w, long long w_expert_bytes,
                                     const uint8_t* __restrict__ ws, long long ws_expert_bytes,
                                     const float* w_scale, const uint16_t* __restrict__ x,
                                     long long x_stride, const float* x_row_scale,
                                     const int* groups, const int* x_rows, const int* y_rows,
                                     float* y, long long y_stride, int N, int K, int M) {
  using F = WFmt<FMT>;
  constexpr int E = F::E;
  constexpr int WORD_ELEMS = E / 4;                 // elements per 32-bit word
  constexpr int SUB_WORDS = (FMT >= W_MXFP4 && MT == 4) ? 2 : 4;  // words per x sub-chunk
  constexpr int SUB = SUB_WORDS * WORD_ELEMS;       // x elements per sub-chunk
  constexpr int BLOCK_WORDS = FMT == W_MXFP4 ? 4 : 2;  // words per FP4 scale block

  int expert = 0, first = 0, count = M;
  if (groups) {
    expert = groups[3 * blockIdx.y];
    first = groups[3 * blockIdx.y + 1];
    count = groups[3 * blockIdx.y + 2];
  }
  if (count <= 0) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * GEMV_ROWS + warp * GEMV_R;
  if (n0 >= N) return;
  const size_t row_bytes = (size_t)K * (FMT == W_BF16 ? 2 : FMT <= W_E5M2 ? 1 : 0) +
                           (FMT >= W_MXFP4 ? (size_t)K / 2 : 0);
  const int sblocks = FMT == W_MXFP4 ? K / 32 : K / 16;  // scale bytes per row (FP4)
  const uint8_t* we = w + (size_t)expert * w_expert_bytes;
  const uint8_t* wse = ws ? ws + (size_t)expert * ws_expert_bytes : nullptr;
  // FP8 E4M3 decodes to value * 2^-8 (folded in here); FP4 block sums are rescaled per block.
  const float wsc = (w_scale ? w_scale[expert] : 1.0f) * (FMT == W_E4M3 ? F::DECODE_FACTOR : 1.0f);
  const int chunks = K / E;

  for (int m0 = 0; m0 < count; m0 += MT) {
    const uint16_t* xr[MT];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      const int s = first + min(m0 + mi, count - 1);  // duplicates past the end are not written
      xr[mi] = x + (size_t)(x_rows ? x_rows[s] : s) * x_stride;
    }
    float acc[GEMV_R][MT];
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r)
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) acc[r][mi] = 0.0f;

#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
      uint32_t raw[GEMV_R][4];
      float sc[GEMV_R][2];
#pragma unroll
      for (int r = 0; r < GEMV_R; ++r) {
        const int n = n0 + r;
        if (n < N) {
          const uint4 u = tpj_ldg16(we + (size_t)n * row_bytes + (size_t)c * 16);
          raw[r][0] = u.x; raw[r][1] = u.y; raw[r][2] = u.z; raw[r][3] = u.w;
          if (FMT == W_MXFP4) {
            sc[r][0] = tpj_e8m0_to_float(__ldg(wse + (size_t)n * sblocks + c));
            sc[r][1] = 0.0f;
          } else if (FMT == W_NVFP4) {
            const uint16_t two = __ldg(reinterpret_cast<const uint16_t*>(
                wse + (size_t)n * sblocks + 2 * (size_t)c));
            sc[r][0] = tpj_e4m3_to_float((uint8_t)(two & 0xffu));
            sc[r][1] = tpj_e4m3_to_float((uint8_t)(two >> 8));
          }
        } else {
          raw[r][0] = raw[r][1] = raw[r][2] = raw[r][3] = 0u;
          sc[r][0] = sc[r][1] = 0.0f;
        }
      }
      float bp[GEMV_R][MT];  // FP4: partial sums of the current scale block
#pragma unroll
      for (int r = 0; r < GEMV_R; ++r)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) bp[r][mi] = 0.0f;
#pragma unroll
      for (int sub = 0; sub < 4 / SUB_WORDS; ++sub) {
        float xv[MT][SUB];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int e8 = 0; e8 < SUB / 8; ++e8)
            load_x8(xr[mi], c * E + sub * SUB + e8 * 8, &xv[mi][e8 * 8]);
#pragma unroll
        for (int wi = 0; wi < SUB_WORDS; ++wi) {
          const int word = sub * SUB_WORDS + wi;
#pragma unroll
          for (int r = 0; r < GEMV_R; ++r) {
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) {
              const float d = word_dot<FMT>(raw[r][word], &xv[mi][wi * WORD_ELEMS]);
              if (FMT >= W_MXFP4) {
                bp[r][mi] += d;
              } else {
                acc[r][mi] += d;
              }
            }
            if (FMT >= W_MXFP4 && (word + 1) % BLOCK_WORDS == 0) {
              const float s = sc[r][FMT == W_NVFP4 ? word / 2 : 0];
#pragma unroll
              for (int mi = 0; mi < MT; ++mi) {
                // Decoded E2M1 carries 2^-14; multiplying it back before the scale keeps
                // large E8M0 scales from overflowing.
                acc[r][mi] = fmaf(bp[r][mi] * TPJ_E2M1_HALF_FACTOR, s, acc[r][mi]);
                bp[r][mi] = 0.0f;
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < GEMV_R; ++r)
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) acc[r][mi] = tpj_warp_sum(acc[r][mi]);
    if (lane < GEMV_R * MT) {
      float v = 0.0f;
#pragma unroll
      for (int r = 0; r < GEMV_R; ++r)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
          if (lane == r * MT + mi) v = acc[r][mi];
      const int r = lane / MT, mi = lane % MT;
      const int n = n0 + r;
      if (n < N && m0 + mi < count) {
        const int s = first + m0 + mi;
        const int xrow = x_rows ? x_rows[s] : s;
        const float xs = x_row_scale ? x_row_scale[xrow] : 1.0f;
        y[(size_t)(y_rows ? y_rows[s] : s) * y_stride + n] = v * wsc * xs;
      }
    }
  }
}

#define GEMV_ENTRY(NAME, FMT, MT)                                                             \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 1) tpj_gemv_##NAME##_m##MT(       \
      const uint8_t* w, long long w_expert_bytes, const uint8_t* ws, long long ws_expert_bytes, \
      const float* w_scale, const uint16_t* x, long long x_stride, const float* x_row_scale, \
      const int* groups, const int* x_rows, const int* y_rows, float* y, long long y_stride,  \
      int N, int K, int M) {                                                                  \
    gemv<FMT, MT>(w, w_expert_bytes, ws, ws_expert_bytes, w_scale, x, x_stride, x_row_scale,  \
                  groups, x_rows, y_rows, y, y_stride, N, K, M);                              \
  }

#define GEMV_M(NAME, FMT) GEMV_ENTRY(NAME, FMT, 1) GEMV_ENTRY(NAME, FMT, 2) GEMV_ENTRY(NAME, FMT, 4)

GEMV_M(bf16, W_BF16)
GEMV_M(e4m3, W_E4M3)
GEMV_M(e5m2, W_E5M2)
GEMV_M(mxfp4, W_MXFP4)
GEMV_M(nvfp4, W_NVFP4)
