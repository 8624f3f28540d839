// Row-wise kernels of the decode step: embedding gather, fused residual add + RMSNorm with the
// next GEMM's input quantisation, SwiGLU, row quantisation, per-group absolute maxima, RoPE with
// the KV-cache write (GQA and MLA), and the step-begin kernel (counter, stamp, variant tables).
//
// Stable ABI (extern "C"; launched by engine/backends/cuda_runner.py, parameters in this order;
// pointers are device pointers, `ll` is long long, every float is 32-bit). A "row scale" input
// is a per-row multiplier of a GEMM output (the activation scale of its input row, folded here
// instead of in the GEMM); null means 1. `out_fmt` is one of the TPJ_ACT_* codes of
// tpj_device.cuh; `out_row_scale` (nullable) receives each row's scale for the next GEMM.
//
//   tpj_embed(const int* tokens, const uint16_t* table, int H, float* residual)
//       grid (B), block 256: residual[b, :] = bf16 table[tokens[b], :].
//   tpj_add_rmsnorm(float* x, ll x_stride, const float* x_row_scale, const float* add,
//                   const float* add_row_scale, int H, const float* weight, float eps,
//                   int out_fmt, void* out, float* out_row_scale, uint16_t* out_aux_bf16,
//                   unsigned long long* stamps, const unsigned* counter, int ring_len,
//                   int per_step, int stamp_idx)
//       grid (rows), block 256: v = x * x_row_scale + add * add_row_scale; when add is not null
//       x = v is written back (the residual stream); out = RMSNorm(v) * weight in out_fmt
//       (row-contiguous, H elements a row); out_aux_bf16 (nullable) gets the same values in
//       plain bf16 (the MoE router's input). Block 0 stamps %globaltimer into slot stamp_idx
//       of the step's stamp row (stamps null or stamp_idx < 0: no stamp).
//   tpj_swiglu(const float* gate_up, const float* in_row_scale, int F, int out_fmt, void* out,
//              float* out_row_scale)
//       grid (rows), block 256: out = silu(g) * u, g = gate_up[:, :F], u = gate_up[:, F:].
//   tpj_quant_rows(const float* x, ll x_stride, const float* in_row_scale, int scale_div, int K,
//                  int out_fmt, void* out, float* out_row_scale, const float* group_amax,
//                  int groups)
//       grid (rows), block 256: out[r, :K] = x[r * x_stride + :K] * in_row_scale[r / scale_div]
//       in out_fmt. NVFP4 takes its global scale from group_amax[r % groups] / (6 * 448).
//   tpj_absmax_groups(const float* x, ll x_stride, const float* in_row_scale, int scale_div,
//                     int rows, int K, int groups, float* out)
//       grid (groups), block 256: out[g] = max |x[r, :K] * scale| over rows r with r % groups == g.
//   tpj_rope_qkv(const float* qkv, const float* row_scale, int Hq, int Hkv, int D,
//                const float* cos_sin, float* q_out, void* k_cache, void* v_cache, int kv_fmt,
//                float kv_scale, int Lmax, int pos)
//       grid (B, Hq + 2 Hkv), block max(32, D/2): rotate-half RoPE of q and k heads; q to
//       q_out (B, Hq, D) float; k and v encoded (kv_fmt 0 bf16, 1 E4M3, 2 E5M2, value / kv_scale)
//       into cache position pos of (B, Hkv, Lmax, D). cos_sin holds cos[D/2] then sin[D/2].
//   tpj_rope_rows(const float* x, ll x_stride, int x_offset, const float* row_scale,
//                 int scale_div, int D, const float* cos_sin, float* out)
//       grid (rows), block max(32, D/2): out[r, :D] = RoPE(x[r * x_stride + x_offset + :D]).
//   tpj_mla_kv_write(const float* kva, const float* row_scale, int rank, int rope,
//                    const float* norm_weight, float eps, const float* cos_sin, void* ckv_cache,
//                    void* krope_cache, int kv_fmt, float kv_scale, int Lmax, int pos)
//       grid (B), block 256: latent = RMSNorm(kva[b, :rank]) -> ckv_cache[b, pos, :];
//       RoPE(kva[b, rank:]) -> krope_cache[b, pos, :].
//   tpj_step_begin(unsigned* counter, unsigned long long* stamps, int ring_len, int per_step)
//       grid (1), block 32: counter += 1, then stamp slot 0 of the new step's row.
//   tpj_select_variant(const unsigned* counter, const uint8_t* variants, ll variant_bytes,
//                      int n_variants, uint8_t* current)
//       grid (any), block 256: current = variants[(counter - 1) % n_variants] (16-byte units;
//       variant_bytes is a multiple of 16).
//   tpj_step_end(const unsigned* counter, unsigned long long* stamps, int ring_len,
//                int per_step, int idx)
//       grid (1), block 32: stamp slot idx of the step's row.
#include "tpj_device.cuh"

#define ROW_THREADS 256

extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)
    tpj_embed(const int* tokens, const uint16_t* table, int H, float* residual) {
  const int b = blockIdx.x;
  const uint16_t* src = table + (size_t)tokens[b] * H;
  float* dst = residual + (size_t)b * H;
  for (int k = threadIdx.x; k < H; k += blockDim.x) dst[k] = tpj_bf16_to_float(src[k]);
}

template <int N, typename F>
__device__ __forceinline__ void write_fp4_blocks(int K, F value, uint16_t* out,
                                                 float global_scale) {
  for (int blk = threadIdx.x; blk * N < K; blk += blockDim.x) {
    float v[N];
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = value(blk * N + i);
    tpj_fp4_block_to_bf16<N>(v, global_scale, out + blk * N);
  }
}

// Writes a row's values in out_fmt. `value(k)` recomputes element k (cheap: reads that hit
// L1/L2), so no row has to fit in shared memory.
template <typename F>
__device__ __forceinline__ void write_row(int out_fmt, int K, F value, void* out_row,
                                          float* out_row_scale, float global_scale,
                                          float* scratch) {
  if (out_fmt == TPJ_ACT_MXFP4_IN_BF16) {
    write_fp4_blocks<32>(K, value, static_cast<uint16_t*>(out_row), global_scale);
    if (threadIdx.x == 0 && out_row_scale) *out_row_scale = 1.0f;
    return;
  }
  if (out_fmt == TPJ_ACT_NVFP4_IN_BF16) {
    write_fp4_blocks<16>(K, value, static_cast<uint16_t*>(out_row), global_scale);
    if (threadIdx.x == 0 && out_row_scale) *out_row_scale = global_scale;
    return;
  }
  float scale = 1.0f;
  if (tpj_act_needs_amax(out_fmt)) {
    float amax = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(value(k)));
    amax = tpj_block_reduce(amax, scratch, true);
    scale = tpj_act_row_scale(out_fmt, amax);
  }
  for (int k = threadIdx.x; k < K; k += blockDim.x) tpj_act_store(out_fmt, out_row, k, value(k), scale);
  if (threadIdx.x == 0 && out_row_scale) *out_row_scale = scale;
}

__device__ __forceinline__ char* row_ptr(void* base, int out_fmt, size_t row, int K) {
  return static_cast<char*>(base) + row * (size_t)K * tpj_act_elem_bytes(out_fmt);
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)
    tpj_add_rmsnorm(float* x, long long x_stride, const float* x_row_scale, const float* add,
                    const float* add_row_scale, int H, const float* weight, float eps,
                    int out_fmt, void* out, float* out_row_scale, uint16_t* out_aux_bf16,
                    unsigned long long* stamps, const unsigned int* counter, int ring_len,
                    int per_step, int stamp_idx) {
  __shared__ float scratch[32];
  const int r = blockIdx.x;
  if (blockIdx.x == 0 && threadIdx.x == 0)
    tpj_stamp(stamps, counter, ring_len, per_step, stamp_idx);
  float* xr = x + (size_t)r * x_stride;
  const float xs = x_row_scale ? x_row_scale[r] : 1.0f;
  const float as = add_row_scale ? add_row_scale[r] : 1.0f;
  const float* ar = add ? add + (size_t)r * H : nullptr;
  float ss = 0.0f;
  for (int k = threadIdx.x; k < H; k += blockDim.x) {
    float v = xr[k] * xs;
    if (ar) {
      v += ar[k] * as;
      xr[k] = v;  // each element is read and written by the same thread
    }
    ss += v * v;
  }
  ss = tpj_block_reduce(ss, scratch, false);
  const float inv = 1.0f / sqrtf(ss / (float)H + eps);
  // With an add the row now holds v itself; without one it still needs its scale.
  const float xs2 = ar ? 1.0f : xs;
  auto value = [&](int k) { return xr[k] * xs2 * inv * weight[k]; };
  write_row(out_fmt, H, value, row_ptr(out, out_fmt, r, H), out_row_scale ? out_row_scale + r : nullptr,
            1.0f, scratch);
  if (out_aux_bf16) {
    for (int k = threadIdx.x; k < H; k += blockDim.x)
      out_aux_bf16[(size_t)r * H + k] = tpj_float_to_bf16(value(k));
  }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)
    tpj_swiglu(const float* gate_up, const float* in_row_scale, int F, int out_fmt, void* out,
               float* out_row_scale) {
  __shared__ float scratch[32];
  const int r = blockIdx.x;
  const float* g = gate_up + (size_t)r * 2 * F;
  const float s = in_row_scale ? in_row_scale[r] : 1.0f;
  auto value = [&](int k) {
    const float a = g[k] * s, u = g[F + k] * s;
    return a / (1.0f + expf(-a)) * u;
  };
  write_row(out_fmt, F, value, row_ptr(out, out_fmt, r, F), out_row_scale ? out_row_scale + r : nullptr,
            1.0f, scratch);
}

__device__ __forceinline__ float nv_global_scale(float amax) {
  const float g = amax / (TPJ_E2M1_MAX * TPJ_E4M3_MAX);
  return g > 0.0f ? g : 1.0f;
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)
    tpj_quant_rows(const float* x, long long x_stride, const float* in_row_scale, int scale_div,
                   int K, int out_fmt, void* out, float* out_row_scale, const float* group_amax,
                   int groups) {
  __shared__ float scratch[32];
  const int r = blockIdx.x;
  const float* xr = x + (size_t)r * x_stride;
  const float s = in_row_scale ? in_row_scale[r / scale_div] : 1.0f;
  const float g = group_amax ? nv_global_scale(group_amax[r % groups]) : 1.0f;
  auto value = [&](int k) { return xr[k] * s; };
  write_row(out_fmt, K, value, row_ptr(out, out_fmt, r, K), out_row_scale ? out_row_scale + r : nullptr,
            g, scratch);
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)
    tpj_absmax_groups(const float* x, long long x_stride, const float* in_row_scale,
                      int scale_div, int rows, int K, int groups, float* out) {
  __shared__ float scratch[32];
  const int grp = blockIdx.x;
  float amax = 0.0f;
  for (int r = grp; r < rows; r += groups) {
    const float s = in_row_scale ? in_row_scale[r / scale_div] : 1.0f;
    const float* xr = x + (size_t)r * x_stride;
    for (int k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(xr[k] * s));
  }
  amax = tpj_block_reduce(amax, scratch, true);
  if (threadIdx.x == 0) out[grp] = amax;
}

__device__ __forceinline__ void kv_store(void* cache, size_t idx, int kv_fmt, float v,
                                         float kv_scale) {
  if (kv_fmt == 0) {
    static_cast<uint16_t*>(cache)[idx] = tpj_float_to_bf16(v);
  } else if (kv_fmt == 1) {
    static_cast<uint8_t*>(cache)[idx] = tpj_float_to_e4m3(v / kv_scale);
  } else {
    static_cast<uint8_t*>(cache)[idx] = tpj_float_to_e5m2(v / kv_scale);
  }
}

// Rotate-half RoPE of one row of D values: pairs (i, i + D/2) turn by the angle whose cosine
// and sine are cos_sin[i] and cos_sin[D/2 + i]. Thread t handles pair t (and t + blockDim.x...).
template <typename In, typename Out>
__device__ __forceinline__ void rope_row(In in, Out outf, int D, const float* cos_sin) {
  const int half = D / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float a = in(i), b = in(i + half);
    const float c = cos_sin[i], s = cos_sin[half + i];
    outf(i, a * c - b * s);
    outf(i + half, b * c + a * s);
  }
}

extern "C" __global__ void tpj_rope_qkv(const float* qkv, const float* row_scale, int Hq,
                                        int Hkv, int D, const float* cos_sin, float* q_out,
                                        void* k_cache, void* v_cache, int kv_fmt,
                                        float kv_scale, int Lmax, int pos) {
  const int b = blockIdx.x, h = blockIdx.y;
  const int heads = Hq + 2 * Hkv;
  const float s = row_scale ? row_scale[b] : 1.0f;
  const float* src = qkv + ((size_t)b * heads + h) * D;
  auto in = [&](int i) { return src[i] * s; };
  if (h < Hq) {
    float* dst = q_out + ((size_t)b * Hq + h) * D;
    rope_row(in, [&](int i, float v) { dst[i] = v; }, D, cos_sin);
  } else if (h < Hq + Hkv) {
    const size_t base = (((size_t)b * Hkv + (h - Hq)) * Lmax + pos) * D;
    rope_row(in, [&](int i, float v) { kv_store(k_cache, base + i, kv_fmt, v, kv_scale); }, D,
             cos_sin);
  } else {
    const size_t base = (((size_t)b * Hkv + (h - Hq - Hkv)) * Lmax + pos) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
      kv_store(v_cache, base + i, kv_fmt, in(i), kv_scale);
  }
}

extern "C" __global__ void tpj_rope_rows(const float* x, long long x_stride, int x_offset,
                                         const float* row_scale, int scale_div, int D,
                                         const float* cos_sin, float* out) {
  const int r = blockIdx.x;
  const float s = row_scale ? row_scale[r / scale_div] : 1.0f;
  const float* src = x + (size_t)r * x_stride + x_offset;
  float* dst = out + (size_t)r * D;
  rope_row([&](int i) { return src[i] * s; }, [&](int i, float v) { dst[i] = v; }, D, cos_sin);
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)
    tpj_mla_kv_write(const float* kva, const float* row_scale, int rank, int rope,
                     const float* norm_weight, float eps, const float* cos_sin, void* ckv_cache,
                     void* krope_cache, int kv_fmt, float kv_scale, int Lmax, int pos) {
  __shared__ float scratch[32];
  const int b = blockIdx.x;
  const float s = row_scale ? row_scale[b] : 1.0f;
  const float* src = kva + (size_t)b * (rank + rope);
  float ss = 0.0f;
  for (int k = threadIdx.x; k < rank; k += blockDim.x) {
    const float v = src[k] * s;
    ss += v * v;
  }
  ss = tpj_block_reduce(ss, scratch, false);
  const float inv = 1.0f / sqrtf(ss / (float)rank + eps);
  const size_t cbase = ((size_t)b * Lmax + pos) * rank;
  for (int k = threadIdx.x; k < rank; k += blockDim.x)
    kv_store(ckv_cache, cbase + k, kv_fmt, src[k] * s * inv * norm_weight[k], kv_scale);
  const size_t rbase = ((size_t)b * Lmax + pos) * rope;
  rope_row([&](int i) { return src[rank + i] * s; },
           [&](int i, float v) { kv_store(krope_cache, rbase + i, kv_fmt, v, kv_scale); }, rope,
           cos_sin);
}

extern "C" __global__ void tpj_step_begin(unsigned int* counter, unsigned long long* stamps,
                                          int ring_len, int per_step) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    *counter += 1u;
    tpj_stamp(stamps, counter, ring_len, per_step, 0);
  }
}

extern "C" __global__ void tpj_select_variant(const unsigned int* counter, const uint8_t* variants,
                                              long long variant_bytes, int n_variants,
                                              uint8_t* current) {
  const unsigned int v = (*counter - 1u) % (unsigned int)n_variants;
  const uint4* src = reinterpret_cast<const uint4*>(variants + (size_t)v * variant_bytes);
  uint4* dst = reinterpret_cast<uint4*>(current);
  const long long n16 = variant_bytes / 16;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16;
       i += (long long)gridDim.x * blockDim.x)
    dst[i] = src[i];
}

extern "C" __global__ void tpj_step_end(const unsigned int* counter, unsigned long long* stamps,
                                        int ring_len, int per_step, int idx) {
  if (threadIdx.x == 0 && blockIdx.x == 0) tpj_stamp(stamps, counter, ring_len, per_step, idx);
}
