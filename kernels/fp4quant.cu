// Activation quantisation to packed FP4 for the native block-scaled GEMMs of cuBLASLt
// (sm_100 and newer): E2M1 codes two a byte (element 2i in the low nibble) and the block scales
// in cuBLASLt's interleaved layout (tpj_block_scale_offset).
//
// Stable ABI (extern "C"; device pointers):
//   tpj_quant_fp4_native(const float* x, long long x_stride, const float* in_row_scale, int K,
//                        int nv, uint8_t* out, uint8_t* scales, int groups_padded,
//                        float* out_row_scale, const float* amax)
//     grid (rows), block 128: row r of x (times in_row_scale[r], nullable) quantised as NVFP4
//     (nv = 1: blocks of 16, E4M3 scales relative to the global scale amax[0] / (6 * 448))
//     or MXFP4 (nv = 0: blocks of 32, E8M0 scales); out is (rows, K / 2); out_row_scale[r]
//     (nullable) gets the global scale (1 for MXFP4). K % 32 == 0.
#include "tpj_device.cuh"

template <int N>
__device__ __forceinline__ void quant_row(const float* xr, float s, int K, float g, uint8_t* out,
                                          uint8_t* scales, int r, int groups_padded) {
  for (int blk = threadIdx.x; blk * N < K; blk += blockDim.x) {
    float v[N];
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = xr[blk * N + i] * s;
    uint8_t codes[N];
    scales[tpj_block_scale_offset(r, blk, groups_padded)] = tpj_fp4_quant_block<N>(v, g, codes);
#pragma unroll
    for (int i = 0; i < N; i += 2) out[(blk * N + i) / 2] = (uint8_t)(codes[i] | (codes[i + 1] << 4));
  }
}

extern "C" __global__ void __launch_bounds__(128, 1)
    tpj_quant_fp4_native(const float* x, long long x_stride, const float* in_row_scale, int K,
                         int nv, uint8_t* out, uint8_t* scales, int groups_padded,
                         float* out_row_scale, const float* amax) {
  const int r = blockIdx.x;
  const float s = in_row_scale ? in_row_scale[r] : 1.0f;
  const float* xr = x + (size_t)r * x_stride;
  uint8_t* o = out + (size_t)r * (K / 2);
  float g = 1.0f;
  if (nv) {
    g = amax[0] / (TPJ_E2M1_MAX * TPJ_E4M3_MAX);
    g = g > 0.0f ? g : 1.0f;
    quant_row<16>(xr, s, K, g, o, scales, r, groups_padded);
  } else {
    quant_row<32>(xr, s, K, g, o, scales, r, groups_padded);
  }
  if (threadIdx.x == 0 && out_row_scale) out_row_scale[r] = g;
}
