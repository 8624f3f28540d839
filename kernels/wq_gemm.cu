// Weight-only skinny GEMM on tensor cores (mma.sync m16n8k16, BF16 in, FP32 accumulate; sm_80
// and newer) for batches too large for the CUDA-core GEMV: weights in BF16, FP8 (E4M3, E5M2)
// or FP4 (MXFP4, NVFP4) are decoded to BF16 in registers (exactly: every FP8 value, and every
// FP4 value times its block scale, is a BF16 value) straight from 16-byte global loads; the
// global NVFP4 / FP8 scale is applied to the FP32 result. This is how FP4 weights run at
// batch > 4 on Hopper, which has no FP4 tensor cores.
//
// Layout trick: the dot product does not care in which order k runs, as long as the weight
// (A) and activation (B) fragments agree, so each thread feeds the mma with the elements of
// its own contiguous 16-byte weight chunk (k permuted inside the chunk) and no shared memory
// or shuffle is needed to build fragments.
//
// Stable ABI (extern "C"; device pointers; `ll` is long long):
//   tpj_wq_gemm_{bf16,e4m3,e5m2,mxfp4,nvfp4}_w{M}n{N}(
//       const uint8_t* w, ll w_expert_bytes, const uint8_t* ws, ll ws_expert_bytes,
//       const float* w_scale, const uint16_t* x, ll x_stride, const float* x_row_scale,
//       const int* tiles, const int* x_rows, const int* y_rows, float* y, ll y_stride,
//       int N, int K)
//   Same contract as tpj_gemv_* (gemv.cu) except the grouping: tile blockIdx.y is
//   (expert, first slot, slot count) = tiles[3 * blockIdx.y .. + 2] with count <= 8 * N_TILES
//   (a count of 0 leaves the block idle). Variants (M, N) = m16 tiles of weight rows and n8
//   tiles of slots a warp computes: w1n1, w1n2, w2n4, w2n8. grid (ceil(N / (16 * M)),
//   tiles), block 128 (the 4 warps split K and add up at the end). K % 32 == 0 (FP4), 16
//   (FP8), 8 (BF16).
#include "tpj_device.cuh"

#define W_BF16 0
#define W_E4M3 1
#define W_E5M2 2
#define W_MXFP4 3
#define W_NVFP4 4
#define WQ_THREADS 128

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return (uint32_t)tpj_float_to_bf16(lo) | ((uint32_t)tpj_float_to_bf16(hi) << 16);
}

// Half2 bits -> bf16x2 bits of the values times f0 times f1 (exact for the values used here:
// FP8 values, and FP4 values times their block scale, are all bf16 values). Two factors so
// that the FP4 decode factor 2^14 and a large E8M0 scale never overflow in one product.
__device__ __forceinline__ uint32_t half2_to_bf16x2(uint32_t h, float f0, float f1) {
  const float2 v = tpj_half2_to_float2(h);
  return pack_bf16x2(v.x * f0 * f1, v.y * f0 * f1);
}

template <int FMT>
struct WqFmt {
  static constexpr int EPT = FMT == W_BF16 ? 8 : (FMT <= W_E5M2 ? 16 : 32);  // elems / 16 B
  static constexpr int KC = 4 * EPT;  // k per warp iteration (4 threads of a group)
  static constexpr int STEPS_PER_WORD = FMT == W_BF16 ? 1 : 2;  // mma k16 steps a word feeds
};

// The two A registers (k pair 0 and k pair 1 of one row) that word `word` of a thread's chunk
// feeds to mma step `u` (0 or 1) of that word; `f` is the FP8 half-trick factor or the FP4
// block scale.
template <int FMT>
__device__ __forceinline__ void a_regs(const uint32_t (&raw)[4], int word, int u, float f,
                                       uint32_t& r0, uint32_t& r1) {
  if (FMT == W_BF16) {
    // one step per two words: u selects nothing; words 2s and 2s+1 give the pairs
    r0 = raw[word];
    r1 = raw[word + 1];
  } else if (FMT == W_E4M3) {
    r0 = half2_to_bf16x2(tpj_e4m3x2_to_half2_scaled(raw[word], 0), f, 1.0f);
    r1 = half2_to_bf16x2(tpj_e4m3x2_to_half2_scaled(raw[word], 1), f, 1.0f);
  } else if (FMT == W_E5M2) {
    r0 = half2_to_bf16x2(tpj_e5m2x2_to_half2(raw[word], 0), f, 1.0f);
    r1 = half2_to_bf16x2(tpj_e5m2x2_to_half2(raw[word], 1), f, 1.0f);
  } else {
    // FP4 word: elements 0..7; step u takes pairs (u, u + 4) and (2 + u, 6 + u).
    r0 = half2_to_bf16x2(tpj_e2m1x2_to_half2_scaled(raw[word], u), TPJ_E2M1_HALF_FACTOR, f);
    r1 = half2_to_bf16x2(tpj_e2m1x2_to_half2_scaled(raw[word], 2 + u), TPJ_E2M1_HALF_FACTOR, f);
  }
}

template <int FMT, int WM, int WN>
__device__ __forceinline__ void wq_gemm(const uint8_t* __restrict__ w, long long w_expert_bytes,
                                        const uint8_t* __restrict__ ws, long long ws_expert_bytes,
                                        const float* w_scale, const uint16_t* __restrict__ x,
                                        long long x_stride, const float* x_row_scale,
                                        const int* tiles, const int* x_rows, const int* y_rows,
                                        float* y, long long y_stride, int N, int K) {
  using F = WqFmt<FMT>;
  constexpr int EPT = F::EPT, KC = F::KC;
  __shared__ float s_red[WQ_THREADS / 32][WM][WN][4][32];

  const int expert = tiles[3 * blockIdx.y];
  const int first = tiles[3 * blockIdx.y + 1];
  const int count = tiles[3 * blockIdx.y + 2];
  if (count <= 0) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nbase = blockIdx.x * 16 * WM;
  const size_t row_bytes = FMT == W_BF16 ? (size_t)K * 2 : FMT <= W_E5M2 ? (size_t)K : (size_t)K / 2;
  const int sblocks = FMT == W_MXFP4 ? K / 32 : K / 16;
  const uint8_t* we = w + (size_t)expert * w_expert_bytes;
  const uint8_t* wse = ws ? ws + (size_t)expert * ws_expert_bytes : nullptr;

  // The x rows this thread feeds: slot g of each n8 tile (clamped to the last valid slot).
  const uint16_t* xr[WN];
#pragma unroll
  for (int j = 0; j < WN; ++j) {
    const int s = first + min(j * 8 + g, count - 1);
    xr[j] = x + (size_t)(x_rows ? x_rows[s] : s) * x_stride;
  }
  float acc[WM][WN][4];
#pragma unroll
  for (int i = 0; i < WM; ++i)
#pragma unroll
    for (int j = 0; j < WN; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  const int chunks = (K + KC - 1) / KC;
  for (int c = warp; c < chunks; c += WQ_THREADS / 32) {
    const int k0 = c * KC + EPT * t;  // this thread's first element
    const bool kin = k0 < K;
    uint32_t raw[WM][2][4];
    float fac[WM][2][2];  // FP8 factor, or the FP4 block scales (NVFP4: two per chunk)
#pragma unroll
    for (int i = 0; i < WM; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = nbase + 16 * i + g + 8 * h;
        uint4 u = make_uint4(0u, 0u, 0u, 0u);
        float f0 = FMT == W_E4M3 ? TPJ_E4M3_HALF_FACTOR : 1.0f, f1 = f0;
        if (n < N && kin) {
          const size_t off = FMT == W_BF16 ? (size_t)k0 * 2 : FMT <= W_E5M2 ? (size_t)k0 : (size_t)k0 / 2;
          u = tpj_ldg16(we + (size_t)n * row_bytes + off);
          if (FMT == W_MXFP4) {
            f0 = f1 = tpj_e8m0_to_float(__ldg(wse + (size_t)n * sblocks + k0 / 32));
          } else if (FMT == W_NVFP4) {
            // Keep the two E4M3 codes raw; they are decoded where used (fewer live registers).
            const uint16_t two =
                __ldg(reinterpret_cast<const uint16_t*>(wse + (size_t)n * sblocks + k0 / 16));
            f0 = __uint_as_float((uint32_t)two);
          }
        }
        raw[i][h][0] = u.x; raw[i][h][1] = u.y; raw[i][h][2] = u.z; raw[i][h][3] = u.w;
        fac[i][h][0] = f0;
        fac[i][h][1] = f1;
      }
    }
    if (FMT == W_BF16) {
      // 8 elements = 2 k16 steps: step s uses words 2s and 2s+1 (elements 4s .. 4s+3).
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint32_t b[WN][2];
#pragma unroll
        for (int j = 0; j < WN; ++j) {
          const uint2 v = kin ? tpj_ldg8(xr[j] + k0 + 4 * s) : make_uint2(0u, 0u);
          b[j][0] = v.x;
          b[j][1] = v.y;
        }
#pragma unroll
        for (int i = 0; i < WM; ++i) {
          const uint32_t a[4] = {raw[i][0][2 * s], raw[i][1][2 * s], raw[i][0][2 * s + 1],
                                 raw[i][1][2 * s + 1]};
#pragma unroll
          for (int j = 0; j < WN; ++j) mma_bf16_16816(acc[i][j], a, b[j][0], b[j][1]);
        }
      }
    } else if (FMT == W_E4M3 || FMT == W_E5M2) {
      // 16 elements = 4 words of 4 = 4 k16 steps; step s uses elements 4s .. 4s+3.
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint32_t b[WN][2];
#pragma unroll
        for (int j = 0; j < WN; ++j) {
          const uint2 v = kin ? tpj_ldg8(xr[j] + k0 + 4 * s) : make_uint2(0u, 0u);
          b[j][0] = v.x;
          b[j][1] = v.y;
        }
#pragma unroll
        for (int i = 0; i < WM; ++i) {
          uint32_t a[4];
          a_regs<FMT>(raw[i][0], s, 0, fac[i][0][0], a[0], a[2]);
          a_regs<FMT>(raw[i][1], s, 0, fac[i][1][0], a[1], a[3]);
#pragma unroll
          for (int j = 0; j < WN; ++j) mma_bf16_16816(acc[i][j], a, b[j][0], b[j][1]);
        }
      }
    } else {
      // 32 elements = 4 words of 8 = 8 k16 steps; word q, step u uses elements
      // (8q + u, 8q + 4 + u) and (8q + 2 + u, 8q + 6 + u), in both operands.
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint4 xv[WN];
#pragma unroll
        for (int j = 0; j < WN; ++j)
          xv[j] = kin ? tpj_ldg16(xr[j] + k0 + 8 * q) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          uint32_t b[WN][2];
#pragma unroll
          for (int j = 0; j < WN; ++j) {
            const uint32_t sel = u ? 0x7632u : 0x5410u;
            b[j][0] = __byte_perm(xv[j].x, xv[j].z, sel);  // (x[u], x[4 + u])
            b[j][1] = __byte_perm(xv[j].y, xv[j].w, sel);  // (x[2 + u], x[6 + u])
          }
#pragma unroll
          for (int i = 0; i < WM; ++i) {
            uint32_t a[4];
            float s0 = fac[i][0][0], s1 = fac[i][1][0];
            if (FMT == W_NVFP4) {  // words 0-1 use the low code, words 2-3 the high one
              const int sh = q < 2 ? 0 : 8;
              s0 = tpj_e4m3_to_float((uint8_t)(__float_as_uint(s0) >> sh));
              s1 = tpj_e4m3_to_float((uint8_t)(__float_as_uint(s1) >> sh));
            }
            a_regs<FMT>(raw[i][0], q, u, s0, a[0], a[2]);
            a_regs<FMT>(raw[i][1], q, u, s1, a[1], a[3]);
#pragma unroll
            for (int j = 0; j < WN; ++j) mma_bf16_16816(acc[i][j], a, b[j][0], b[j][1]);
          }
        }
      }
    }
  }

  // Add up the four warps' partial sums (each warp ran a quarter of the k chunks).
#pragma unroll
  for (int i = 0; i < WM; ++i)
#pragma unroll
    for (int j = 0; j < WN; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) s_red[warp][i][j][c][lane] = acc[i][j][c];
  __syncthreads();
  if (warp != 0) return;
  const float wsc = w_scale ? w_scale[expert] : 1.0f;
#pragma unroll
  for (int i = 0; i < WM; ++i) {
#pragma unroll
    for (int j = 0; j < WN; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float v = 0.0f;
#pragma unroll
        for (int wi = 0; wi < WQ_THREADS / 32; ++wi) v += s_red[wi][i][j][c][lane];
        // C fragment: c0, c1 at (row g, cols 2t, 2t+1); c2, c3 at (row g + 8, same cols).
        const int n = nbase + 16 * i + g + (c >= 2 ? 8 : 0);
        const int slot = j * 8 + 2 * t + (c & 1);
        if (n < N && slot < count) {
          const int sidx = first + slot;
          const int xrow = x_rows ? x_rows[sidx] : sidx;
          const float xs = x_row_scale ? x_row_scale[xrow] : 1.0f;
          y[(size_t)(y_rows ? y_rows[sidx] : sidx) * y_stride + n] = v * wsc * xs;
        }
      }
    }
  }
}

#define WQ_ENTRY(NAME, FMT, WM, WN)                                                           \
  extern "C" __global__ void __launch_bounds__(WQ_THREADS, 1) tpj_wq_gemm_##NAME##_w##WM##n##WN( \
      const uint8_t* w, long long w_expert_bytes, const uint8_t* ws, long long ws_expert_bytes, \
      const float* w_scale, const uint16_t* x, long long x_stride, const float* x_row_scale, \
      const int* tiles, const int* x_rows, const int* y_rows, float* y, long long y_stride,   \
      int N, int K) {                                                                         \
    wq_gemm<FMT, WM, WN>(w, w_expert_bytes, ws, ws_expert_bytes, w_scale, x, x_stride,        \
                         x_row_scale, tiles, x_rows, y_rows, y, y_stride, N, K);              \
  }

#define WQ_SHAPES(NAME, FMT) \
  WQ_ENTRY(NAME, FMT, 1, 1)  \
  WQ_ENTRY(NAME, FMT, 1, 2)  \
  WQ_ENTRY(NAME, FMT, 2, 4)  \
  WQ_ENTRY(NAME, FMT, 2, 8)

WQ_SHAPES(bf16, W_BF16)
WQ_SHAPES(e4m3, W_E4M3)
WQ_SHAPES(e5m2, W_E5M2)
WQ_SHAPES(mxfp4, W_MXFP4)
WQ_SHAPES(nvfp4, W_NVFP4)
