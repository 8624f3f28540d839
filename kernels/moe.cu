// Mixture-of-experts routing kernels: router top-k with softmax, gates of a stated routing,
// token permute, and the weighted combine of the experts' outputs.
//
// Stable ABI (extern "C"; device pointers):
//   tpj_moe_topk_softmax(const float* logits, int E, int k, int* assign, float* gates)
//     grid (B), block 32: assign[b, :k] = the k largest logits of row b (ties: lower index
//     first), in descending order; gates[b, :k] = softmax of those logits. k <= 32, E <= 1024.
//   tpj_moe_gates(const float* logits, int E, const int* assign, int k, float* gates)
//     grid (B), block 32: gates[b, j] = softmax_j(logits[b, assign[b, j]]) for a routing given
//     in advance (the engine states its routing distribution instead of trusting random
//     weights to route realistically).
//   tpj_moe_permute(const uint16_t* x, long long x_stride, const int* x_rows, int K,
//                   uint16_t* out)
//     grid (slots), block 128: out[s, :K] = x[x_rows[s], :K] (bf16 rows; K % 8 == 0).
//   tpj_moe_combine(const float* y, const float* y_row_scale, const int* slot_of,
//                   const float* gates, int k, const float* shared,
//                   const float* shared_row_scale, int H, float* out)
//     grid (B), block 256: out[b, :] = sum_j gates[b, j] * y[slot_of[b, j], :] * y_row_scale
//     + shared[b, :] * shared_row_scale (nullable pointers: no term / scale 1).
#include "tpj_device.cuh"

#define MAX_K 32

extern "C" __global__ void tpj_moe_topk_softmax(const float* logits, int E, int k, int* assign,
                                                float* gates) {
  const int b = blockIdx.x, lane = threadIdx.x;
  const float* row = logits + (size_t)b * E;
  float chosen = 0.0f;  // lane j < k keeps the j-th chosen logit
  // Pick j is the best entry strictly after pick j-1 in (value desc, index asc) order.
  float best_prev = tpj_bits_to_float(0x7f800000u);
  int best_prev_idx = -1;
  for (int j = 0; j < k; ++j) {
    float best = tpj_bits_to_float(0xff800000u);
    int best_idx = 0x7fffffff;
    for (int e = lane; e < E; e += 32) {
      const float v = row[e];
      const bool after = v < best_prev || (v == best_prev && e > best_prev_idx);
      if (after && (v > best || (v == best && e < best_idx))) {
        best = v;
        best_idx = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_idx, o);
      if (ov > best || (ov == best && oi < best_idx)) {
        best = ov;
        best_idx = oi;
      }
    }
    if (lane == j) chosen = best;
    if (lane == 0) assign[(size_t)b * k + j] = best_idx;
    best_prev = best;
    best_prev_idx = best_idx;
  }
  const float mx = __shfl_sync(0xffffffffu, chosen, 0);  // the first pick is the largest
  const float p = lane < k ? expf(chosen - mx) : 0.0f;
  const float total = tpj_warp_sum(p);
  if (lane < k) gates[(size_t)b * k + lane] = p / total;
}

extern "C" __global__ void tpj_moe_gates(const float* logits, int E, const int* assign, int k,
                                         float* gates) {
  const int b = blockIdx.x, lane = threadIdx.x;
  const float v = lane < k ? logits[(size_t)b * E + assign[(size_t)b * k + lane]]
                           : tpj_bits_to_float(0xff800000u);
  const float mx = tpj_warp_max(v);
  const float p = lane < k ? expf(v - mx) : 0.0f;
  const float total = tpj_warp_sum(p);
  if (lane < k) gates[(size_t)b * k + lane] = p / total;
}

extern "C" __global__ void tpj_moe_permute(const uint16_t* x, long long x_stride,
                                           const int* x_rows, int K, uint16_t* out) {
  const int s = blockIdx.x;
  const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)x_rows[s] * x_stride);
  uint4* dst = reinterpret_cast<uint4*>(out + (size_t)s * K);
  for (int i = threadIdx.x; i < K / 8; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void tpj_moe_combine(const float* y, const float* y_row_scale,
                                           const int* slot_of, const float* gates, int k,
                                           const float* shared, const float* shared_row_scale,
                                           int H, float* out) {
  __shared__ int slots[MAX_K];
  __shared__ float g[MAX_K];
  const int b = blockIdx.x;
  if (threadIdx.x < k) {
    const int s = slot_of[(size_t)b * k + threadIdx.x];
    slots[threadIdx.x] = s;
    g[threadIdx.x] = gates[(size_t)b * k + threadIdx.x] * (y_row_scale ? y_row_scale[s] : 1.0f);
  }
  __syncthreads();
  const float ss = shared && shared_row_scale ? shared_row_scale[b] : 1.0f;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = shared ? shared[(size_t)b * H + h] * ss : 0.0f;
    for (int j = 0; j < k; ++j) acc = fmaf(g[j], y[(size_t)slots[j] * H + h], acc);
    out[(size_t)b * H + h] = acc;
  }
}
