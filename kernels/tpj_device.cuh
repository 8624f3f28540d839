// Device-only helpers shared by the kernel files: warp reductions, read-only 16-byte loads,
// the %globaltimer stamp, and the activation formats a kernel may write for the next GEMM.
#pragma once

#include "tpj_codecs.cuh"

// Activation output formats (the `out_fmt` argument of every kernel that feeds a GEMM).
// "in BF16" formats hold values of the narrow format exactly in bfloat16, with the per-row
// scale written separately: our own GEMM kernels read them; cuBLASLt reads the code formats.
#define TPJ_ACT_BF16 0          // uint16 bf16, RNE; row scale 1
#define TPJ_ACT_E4M3 1          // uint8 E4M3 codes; row scale amax / 448
#define TPJ_ACT_E5M2 2          // uint8 E5M2 codes; row scale amax / 57344
#define TPJ_ACT_F32 3           // float, unrounded; row scale 1
#define TPJ_ACT_E4M3_IN_BF16 4  // E4M3 values in bf16; row scale amax / 448
#define TPJ_ACT_E5M2_IN_BF16 5  // E5M2 values in bf16; row scale amax / 57344
#define TPJ_ACT_MXFP4_IN_BF16 6 // e2m1 * 2^e per 32-block, in bf16; row scale 1
#define TPJ_ACT_NVFP4_IN_BF16 7 // e2m1 * e4m3 per 16-block, in bf16; row scale = global scale

#define TPJ_WARP 32

__device__ __forceinline__ float tpj_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float tpj_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum, or max of non-negative values, for blockDim.x <= 1024; every thread gets
// the result.
// `scratch` holds at least 32 floats; the call ends with a barrier so it may be reused.
__device__ __forceinline__ float tpj_block_reduce(float v, float* scratch, bool is_max) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = is_max ? tpj_warp_max(v) : tpj_warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < warps ? scratch[lane] : 0.0f;  // 0: identity of sums and of abs maxima
  if (warp == 0) {
    r = is_max ? tpj_warp_max(r) : tpj_warp_sum(r);
    if (lane == 0) scratch[0] = r;
  }
  __syncthreads();
  r = scratch[0];
  __syncthreads();
  return r;
}

// 16-byte read-only load (ld.global.nc.v4): the weights and KV are streamed once.
__device__ __forceinline__ uint4 tpj_ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ uint2 tpj_ldg8(const void* p) {
  return __ldg(reinterpret_cast<const uint2*>(p));
}

__device__ __forceinline__ unsigned long long tpj_globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Stamp slot `idx` of the current step's row in a ring of stamps: row = *counter % ring_len,
// `per_step` stamps a row. Called by one thread; a null ring does nothing.
__device__ __forceinline__ void tpj_stamp(unsigned long long* ring, const unsigned int* counter,
                                          int ring_len, int per_step, int idx) {
  if (ring == nullptr || idx < 0) return;
  const unsigned int row = *counter % (unsigned int)ring_len;
  ring[(size_t)row * per_step + idx] = tpj_globaltimer();
}

// bf16 pair (one 32-bit word) -> two floats.
__device__ __forceinline__ float2 tpj_bf16x2_to_float2(uint32_t u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

// half2 bit pattern -> two floats (exact).
__device__ __forceinline__ float2 tpj_half2_to_float2(uint32_t h) {
  float2 r;
  asm("{\n\t.reg .f16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\t"
      "cvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;\n\t}"
      : "=f"(r.x), "=f"(r.y)
      : "r"(h));
  return r;
}

// Row scale of a narrow format from the row's absolute maximum (engine.formats: amax / max,
// 1 when the row is all zero).
__device__ __forceinline__ float tpj_act_row_scale(int fmt, float amax) {
  float limit = 1.0f;
  if (fmt == TPJ_ACT_E4M3 || fmt == TPJ_ACT_E4M3_IN_BF16) limit = TPJ_E4M3_MAX;
  if (fmt == TPJ_ACT_E5M2 || fmt == TPJ_ACT_E5M2_IN_BF16) limit = TPJ_E5M2_MAX;
  const float s = amax / limit;
  return s > 0.0f ? s : 1.0f;
}

__device__ __forceinline__ bool tpj_act_needs_amax(int fmt) {
  return fmt == TPJ_ACT_E4M3 || fmt == TPJ_ACT_E5M2 || fmt == TPJ_ACT_E4M3_IN_BF16 ||
         fmt == TPJ_ACT_E5M2_IN_BF16;
}

__device__ __forceinline__ bool tpj_act_is_block_fp4(int fmt) {
  return fmt == TPJ_ACT_MXFP4_IN_BF16 || fmt == TPJ_ACT_NVFP4_IN_BF16;
}

// Write element k of a row in an element-wise format (not the block FP4 ones) given the row
// scale (amax-derived for FP8).
__device__ __forceinline__ void tpj_act_store(int fmt, void* row, int k, float v, float scale) {
  switch (fmt) {
    case TPJ_ACT_BF16:
      static_cast<uint16_t*>(row)[k] = tpj_float_to_bf16(v);
      break;
    case TPJ_ACT_E4M3:
      static_cast<uint8_t*>(row)[k] = tpj_float_to_e4m3(v / scale);
      break;
    case TPJ_ACT_E5M2:
      static_cast<uint8_t*>(row)[k] = tpj_float_to_e5m2(v / scale);
      break;
    case TPJ_ACT_F32:
      static_cast<float*>(row)[k] = v;
      break;
    case TPJ_ACT_E4M3_IN_BF16:
      static_cast<uint16_t*>(row)[k] =
          tpj_float_to_bf16(tpj_e4m3_to_float(tpj_float_to_e4m3(v / scale)));
      break;
    case TPJ_ACT_E5M2_IN_BF16:
      static_cast<uint16_t*>(row)[k] =
          tpj_float_to_bf16(tpj_e5m2_to_float(tpj_float_to_e5m2(v / scale)));
      break;
    default:
      break;
  }
}

// Bytes per element of an element-wise activation format.
__device__ __forceinline__ int tpj_act_elem_bytes(int fmt) {
  if (fmt == TPJ_ACT_E4M3 || fmt == TPJ_ACT_E5M2) return 1;
  if (fmt == TPJ_ACT_F32) return 4;
  return 2;
}

// Quantise one block of N (16 or 32) values to FP4 by engine/formats.py's rules: MXFP4 (N = 32)
// takes the E8M0 scale 2^(floor(log2(amax)) - 2), NVFP4 (N = 16) the E4M3 scale
// RNE((amax / 6) / g) relative to the global scale g. Writes the scale code and the E2M1 codes;
// loops are unrolled so the block stays in registers.
template <int N>
__device__ __forceinline__ uint8_t tpj_fp4_quant_block(const float (&v)[N], float g,
                                                       uint8_t (&codes)[N]) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) amax = fmaxf(amax, fabsf(v[i]));
  if (N == 32) {
    int code = 0;
    if (amax > 0.0f) {
      // floor(log2(amax)) from the exponent bits; a subnormal amax clamps to code 0 either way.
      const int e = (int)((__float_as_uint(amax) >> 23) & 0xffu) - 127;
      code = e - 2 + 127;
      code = code < 0 ? 0 : (code > 254 ? 254 : code);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) codes[i] = tpj_float_to_e2m1(ldexpf(v[i], 127 - code));
    return (uint8_t)code;
  }
  const uint8_t sc = tpj_float_to_e4m3((amax / 6.0f) / g);
  const float denom = tpj_e4m3_to_float(sc) * g;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float x = denom > 0.0f ? v[i] / denom : 0.0f;
    codes[i] = tpj_float_to_e2m1(copysignf(x, v[i]));
  }
  return sc;
}

// The same block as FP4 values held exactly in bf16 (e2m1 * block scale; NVFP4's global scale
// is left to the row scale).
template <int N>
__device__ __forceinline__ void tpj_fp4_block_to_bf16(const float (&v)[N], float g,
                                                      uint16_t* out) {
  uint8_t codes[N];
  const uint8_t sc = tpj_fp4_quant_block<N>(v, g, codes);
  const float s = N == 32 ? tpj_e8m0_to_float(sc) : tpj_e4m3_to_float(sc);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = tpj_float_to_bf16(tpj_e2m1_to_float(codes[i]) * s);
}
