// Number-format codecs shared by the host and the device: BF16, FP8 (E4M3FN, E5M2), E2M1
// (FP4) and E8M0 (MX block scales). Bit layouts and rounding follow engine/formats.py exactly:
// every encoder rounds to nearest, ties to even; FP8 and E2M1 encoders saturate to the largest
// finite value (they never produce NaN or inf); the BF16 encoder overflows to +-inf.
//
// Two kinds of decoder live here:
//  * exact scalar decoders (tpj_*_to_float) that return the format's value, NaN codes included;
//  * packed "half-trick" decoders for the hot loops, which turn codes into IEEE half bit
//    patterns with one or two integer operations, so that the hardware's half->float
//    conversion finishes the job. They return the value times a power of two
//    (documented per function) and map NaN codes to finite values: weights and KV entries
//    made by this engine never hold NaN codes.
// The host tests (tests/test_cuda_host.py) compile this header with g++ and compare every code
// against engine/formats.py.
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC (run-time compilation) ships no C library headers: the fixed-width types it needs.
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef long long int64_t;
#else
#include <stdint.h>
#endif

#if defined(__CUDACC__)
#define TPJ_HD __host__ __device__ __forceinline__
#define TPJ_UNROLL _Pragma("unroll")
#else
#define TPJ_UNROLL
#include <math.h>
#include <string.h>
#define TPJ_HD inline
#endif

// Largest finite magnitudes (saturation limits).
#define TPJ_E4M3_MAX 448.0f
#define TPJ_E5M2_MAX 57344.0f
#define TPJ_E2M1_MAX 6.0f
// The half-trick decoders return E4M3 values times 2^-8 and E2M1 values times 2^-14.
#define TPJ_E4M3_HALF_FACTOR 256.0f
#define TPJ_E2M1_HALF_FACTOR 16384.0f

TPJ_HD float tpj_bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
#endif
}

TPJ_HD uint32_t tpj_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b;
#endif
}

TPJ_HD float tpj_rint(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);  // round to nearest even, always
#else
  return rintf(x);  // the default (and only used) host rounding mode: nearest even
#endif
}

// 2^e as a float for e in [-126, 127] (normal range), built from bits so it is exact.
TPJ_HD float tpj_pow2(int e) { return tpj_bits_to_float((uint32_t)(e + 127) << 23); }

// ---------------------------------------------------------------------------- BF16

TPJ_HD float tpj_bf16_to_float(uint16_t code) { return tpj_bits_to_float((uint32_t)code << 16); }

// float -> bfloat16 bits, RNE; NaN stays a (quiet) NaN with its sign; overflow gives +-inf.
TPJ_HD uint16_t tpj_float_to_bf16(float f) {
  uint32_t u = tpj_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// ---------------------------------------------------------------------------- FP8

// Exact E4M3FN value of a code: bias 7, no infinities, 0x7f/0xff are NaN.
TPJ_HD float tpj_e4m3_to_float(uint8_t code) {
  const uint32_t sign = (uint32_t)(code & 0x80u) << 24;
  const uint32_t e = (code >> 3) & 0xfu, m = code & 0x7u;
  if (e == 0xfu && m == 0x7u) return tpj_bits_to_float(sign | 0x7fc00000u);
  if (e == 0) {  // subnormal: m * 2^-9
    const float v = (float)m * 0.001953125f;
    return sign ? -v : v;
  }
  return tpj_bits_to_float(sign | ((e + 120u) << 23) | (m << 20));
}

// Exact E5M2 value of a code: it is the upper byte of an IEEE half.
TPJ_HD float tpj_e5m2_to_float(uint8_t code) {
  const uint32_t sign = (uint32_t)(code & 0x80u) << 24;
  const uint32_t e = (code >> 2) & 0x1fu, m = code & 0x3u;
  if (e == 0x1fu) return tpj_bits_to_float(sign | (m ? 0x7fc00000u : 0x7f800000u));
  if (e == 0) {  // subnormal: m * 2^-16
    const float v = (float)m * 1.52587890625e-05f;
    return sign ? -v : v;
  }
  return tpj_bits_to_float(sign | ((e + 112u) << 23) | (m << 21));
}

// Generic saturating RNE encoder for a small float format with `ebits` exponent bits,
// `mbits` mantissa bits and the given bias; `max_code` is the magnitude code of the largest
// finite value `max_val`. Input must not be NaN. The sign of zero is kept.
TPJ_HD uint8_t tpj_encode_small_float(float x, int mbits, int bias, float max_val,
                                      uint32_t max_code) {
  const uint32_t u = tpj_float_to_bits(x);
  const float a = tpj_bits_to_float(u & 0x7fffffffu);
  uint32_t mag;
  if (a >= max_val) {
    mag = max_code;
  } else {
    const int emin = 1 - bias;  // exponent of the smallest normal
    const int e_raw = (int)((tpj_float_to_bits(a) >> 23) & 0xffu) - 127;
    // float32 subnormal inputs (e_raw = -127) are far below every format's range here.
    const int e = e_raw < emin ? emin : e_raw;
    // quantum 2^(e - mbits); q = a / quantum is exact (a power-of-two scaling).
    const float q = tpj_rint(a * tpj_pow2(mbits - e));
    const uint32_t qi = (uint32_t)q;
    if (e_raw < emin) {
      mag = qi;  // subnormal codes 0 .. 2^mbits (the last is the smallest normal)
    } else {
      mag = ((uint32_t)(e + bias) << mbits) + (qi - (1u << mbits));  // carries on overflow
    }
  }
  return (uint8_t)mag;
}

// float -> E4M3FN code: clamp to +-448, RNE (engine.formats.encode_fp8).
TPJ_HD uint8_t tpj_float_to_e4m3(float x) {
  const uint8_t mag = tpj_encode_small_float(x, 3, 7, TPJ_E4M3_MAX, 0x7eu);
  return (uint8_t)(mag | ((tpj_float_to_bits(x) >> 24) & 0x80u));
}

// float -> E5M2 code: clamp to +-57344, RNE.
TPJ_HD uint8_t tpj_float_to_e5m2(float x) {
  const uint8_t mag = tpj_encode_small_float(x, 2, 15, TPJ_E5M2_MAX, 0x7bu);
  return (uint8_t)(mag | ((tpj_float_to_bits(x) >> 24) & 0x80u));
}

// ---------------------------------------------------------------------------- E2M1, E8M0

// Exact E2M1 value of a nibble (bit 3 is the sign): magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
TPJ_HD float tpj_e2m1_to_float(uint32_t nibble) {
  const uint32_t e = (nibble >> 1) & 0x3u, m = nibble & 0x1u;
  float v = e == 0 ? 0.5f * (float)m : tpj_bits_to_float(((e + 126u) << 23) | (m << 22));
  return (nibble & 0x8u) ? -v : v;
}

// float -> E2M1 nibble: clamp to +-6, RNE, sign of zero kept (engine.formats.encode_e2m1).
TPJ_HD uint8_t tpj_float_to_e2m1(float x) {
  const uint8_t mag = tpj_encode_small_float(x, 1, 1, TPJ_E2M1_MAX, 0x7u);
  return (uint8_t)(mag | ((tpj_float_to_bits(x) >> 28) & 0x8u));
}

// Exact E8M0 value: 2^(code - 127); code 0 is the float32 subnormal 2^-127, 255 is NaN.
TPJ_HD float tpj_e8m0_to_float(uint8_t code) {
  if (code == 0) return tpj_bits_to_float(0x00400000u);
  if (code == 255) return tpj_bits_to_float(0x7fc00000u);
  return tpj_bits_to_float((uint32_t)code << 23);
}

// ---------------------------------------------------------------------------- packed decoders

// Two E2M1 nibbles of `w` (bits 4j..4j+3 and 16+4j..16+4j+3, i.e. elements j and j+4 of the
// eight packed in a little-endian word) as a half2 bit pattern whose values are the E2M1 values
// times 2^-14 (exact: every E2M1 value is a half normal or subnormal at that scale).
TPJ_HD uint32_t tpj_e2m1x2_to_half2_scaled(uint32_t w, int j) {
  const uint32_t t = w >> (4 * j);
  return ((t & 0x00070007u) << 9) | ((t & 0x00080008u) << 12);
}

// Bytes 0 and 1 (lo = 1: bytes 2 and 3) of `w`, E4M3FN codes, as a half2 bit pattern whose
// values are the E4M3 values times 2^-8 (NaN codes give finite values).
TPJ_HD uint32_t tpj_e4m3x2_to_half2_scaled(uint32_t w, int hi) {
  const uint32_t b = hi ? (w >> 16) : w;
  // x = code0 << 8 | code1 << 24, then shift the 7 magnitude bits down by one into place.
  const uint32_t x = ((b & 0xffu) << 8) | ((b & 0xff00u) << 16);
  return ((x >> 1) & 0x3fff3fffu) | (x & 0x80008000u);
}

// Bytes 0 and 1 (hi = 1: bytes 2 and 3) of `w`, E5M2 codes, as a half2 bit pattern with the
// exact E5M2 values (an E5M2 code is the upper byte of a half).
TPJ_HD uint32_t tpj_e5m2x2_to_half2(uint32_t w, int hi) {
  const uint32_t b = hi ? (w >> 16) : w;
  return ((b & 0xffu) << 8) | ((b & 0xff00u) << 16);
}

// IEEE half bits -> float (exact), for host tests and for device code paths that want it.
TPJ_HD float tpj_half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return tpj_bits_to_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = (float)m * 5.9604644775390625e-08f;  // m * 2^-24
    return sign ? -v : v;
  }
  return tpj_bits_to_float(sign | ((e + 112u) << 23) | (m << 13));
}

// ---------------------------------------------------------------------------- cuBLASLt scales

// Byte offset of the block scale of row r, scale group g in cuBLASLt's interleaved layout for
// block-scaled FP4/FP8 operands (tiles of 128 rows x 4 groups, 512 bytes each; rows padded to a
// multiple of 128 and groups to a multiple of 4). `groups_padded` is the padded group count.
// Source: the cuBLAS guide, "1D block scaling factors layout", as implemented by nvmath-python's
// get_block_scale_offset.
TPJ_HD uint32_t tpj_block_scale_offset(uint32_t r, uint32_t g, uint32_t groups_padded) {
  const uint32_t tile = (g / 4u) * 4u + (r / 128u) * groups_padded;
  const uint32_t rr = r % 128u;
  return tile * 128u + (rr % 32u) * 16u + (rr / 32u) * 4u + g % 4u;
}
