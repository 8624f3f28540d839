// Online softmax and the split-K (flash-decoding) merge, shared by the host and the device.
//
// Scores are in the log2 domain: s = (q . k) * sm_scale * log2(e), so that exp2 replaces exp.
// A partial attention state over a set of positions is (m, l, acc[D]):
//   m   = max of its scores (-inf when the set is empty),
//   l   = sum of 2^(s - m),
//   acc = sum of 2^(s - m) * v        (unnormalised).
// The attention output is acc / l. Two states merge by rescaling both to the larger max. An
// empty state (m = -inf, l = 0, acc = 0) merges as the identity, and merging two empty states
// stays empty (no NaN from -inf - -inf).
// Host tests (tests/test_cuda_host.py) split random problems into chunks, fold and merge them
// with these functions and compare against a float64 softmax.
#pragma once

#include "tpj_codecs.cuh"

#define TPJ_LOG2E 1.4426950408889634f

TPJ_HD float tpj_neg_inf() { return tpj_bits_to_float(0xff800000u); }

TPJ_HD float tpj_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return exp2f(x);
#endif
}

// 2^(a - mx), 0 when a is -inf (an empty state), whatever mx is.
TPJ_HD float tpj_rescale(float a, float mx) {
  return a == tpj_neg_inf() ? 0.0f : tpj_exp2(a - mx);
}

// Fold U new scores into (m, l). Writes p[i] = 2^(s[i] - m_new) and returns the factor the
// caller must multiply its accumulator by before adding sum_i p[i] * v_i.
template <int U>
TPJ_HD float tpj_softmax_fold(float& m, float& l, const float (&s)[U], float (&p)[U]) {
  float m_new = m;
TPJ_UNROLL
  for (int i = 0; i < U; ++i) m_new = s[i] > m_new ? s[i] : m_new;
  const float corr = tpj_rescale(m, m_new);
  float add = 0.0f;
TPJ_UNROLL
  for (int i = 0; i < U; ++i) {
    p[i] = tpj_rescale(s[i], m_new);
    add += p[i];
  }
  l = l * corr + add;
  m = m_new;
  return corr;
}

// Merge state 2 into state 1: returns (c1, c2), the factors for acc1 and acc2
// (acc = acc1 * c1 + acc2 * c2); updates m1 and l1.
TPJ_HD void tpj_softmax_merge2(float& m1, float& l1, float m2, float l2, float& c1, float& c2) {
  const float mx = m1 > m2 ? m1 : m2;
  c1 = tpj_rescale(m1, mx);
  c2 = tpj_rescale(m2, mx);
  l1 = l1 * c1 + l2 * c2;
  m1 = mx;
}

// The weights that turn n partial states (m[i * stride], l[i * stride]) into the final output:
// out = sum_i w[i] * acc_i, with w[i] = 2^(m_i - M) / sum_j l_j 2^(m_j - M). Returns the
// denominator (0 only when every state is empty).
TPJ_HD float tpj_merge_weights(const float* m, const float* l, int n, int stride, float* w) {
  float mx = tpj_neg_inf();
  for (int i = 0; i < n; ++i) mx = m[i * stride] > mx ? m[i * stride] : mx;
  float total = 0.0f;
  for (int i = 0; i < n; ++i) {
    w[i] = tpj_rescale(m[i * stride], mx);
    total += l[i * stride] * w[i];
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int i = 0; i < n; ++i) w[i] *= inv;
  return total;
}
