// Host driver for the shared __host__ __device__ headers: reads binary input on stdin, runs the
// header's functions on the CPU and writes binary output on stdout. tests/test_cuda_host.py
// builds it with the host compiler and checks the output against engine/formats.py and NumPy.
//
// Modes (argv[1]); all integers and floats little-endian:
//   decode   no input. Output float32: e4m3[256], e5m2[256], e2m1[16], e8m0[256],
//            bf16[65536], half[65536] (exact scalar decoders).
//   encode   input: int32 n, float32 x[n]. Output uint8 e4m3[n], uint8 e5m2[n],
//            uint8 e2m1[n], uint16 bf16[n].
//   packed   input: int32 n, uint32 w[n]. Output uint32: for each word, e2m1 pairs j=0..3,
//            then e4m3 halves 0..1, then e5m2 halves 0..1 (8 words per input word).
//   softmax  input: int32 n, int32 d, int32 chunks, int32 bounds[chunks + 1], float32 s[n]
//            (log2-domain scores), float32 v[n * d]. Each chunk is folded 2 scores at a time
//            (one left over folds alone), chunk states are merged pairwise into a running
//            state and, separately, all at once with tpj_merge_weights. Output float32
//            out_pairwise[d], out_weights[d].
//   scales   input: int32 rows, int32 groups. Output uint32 offsets[rows * groups] of
//            tpj_block_scale_offset (cuBLASLt's interleaved block-scale layout), row-major.
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "../tpj_codecs.cuh"
#include "../tpj_softmax.cuh"

template <typename T>
static std::vector<T> read_n(size_t n) {
  std::vector<T> v(n);
  if (n && fread(v.data(), sizeof(T), n, stdin) != n) {
    fprintf(stderr, "short input\n");
    exit(2);
  }
  return v;
}

template <typename T>
static void write_all(const std::vector<T>& v) {
  fwrite(v.data(), sizeof(T), v.size(), stdout);
}

static int read_int() { return read_n<int32_t>(1)[0]; }

static void mode_decode() {
  std::vector<float> out;
  for (int c = 0; c < 256; ++c) out.push_back(tpj_e4m3_to_float((uint8_t)c));
  for (int c = 0; c < 256; ++c) out.push_back(tpj_e5m2_to_float((uint8_t)c));
  for (int c = 0; c < 16; ++c) out.push_back(tpj_e2m1_to_float((uint32_t)c));
  for (int c = 0; c < 256; ++c) out.push_back(tpj_e8m0_to_float((uint8_t)c));
  for (int c = 0; c < 65536; ++c) out.push_back(tpj_bf16_to_float((uint16_t)c));
  for (int c = 0; c < 65536; ++c) out.push_back(tpj_half_to_float((uint16_t)c));
  write_all(out);
}

static void mode_encode() {
  const int n = read_int();
  const std::vector<float> x = read_n<float>(n);
  std::vector<uint8_t> e4(n), e5(n), e2(n);
  std::vector<uint16_t> bf(n);
  for (int i = 0; i < n; ++i) {
    e4[i] = tpj_float_to_e4m3(x[i]);
    e5[i] = tpj_float_to_e5m2(x[i]);
    e2[i] = tpj_float_to_e2m1(x[i]);
    bf[i] = tpj_float_to_bf16(x[i]);
  }
  write_all(e4);
  write_all(e5);
  write_all(e2);
  write_all(bf);
}

static void mode_packed() {
  const int n = read_int();
  const std::vector<uint32_t> w = read_n<uint32_t>(n);
  std::vector<uint32_t> out;
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < 4; ++j) out.push_back(tpj_e2m1x2_to_half2_scaled(w[i], j));
    for (int h = 0; h < 2; ++h) out.push_back(tpj_e4m3x2_to_half2_scaled(w[i], h));
    for (int h = 0; h < 2; ++h) out.push_back(tpj_e5m2x2_to_half2(w[i], h));
  }
  write_all(out);
}

static void mode_softmax() {
  const int n = read_int(), d = read_int(), chunks = read_int();
  const std::vector<int32_t> bounds = read_n<int32_t>(chunks + 1);
  const std::vector<float> s = read_n<float>(n);
  const std::vector<float> v = read_n<float>((size_t)n * d);
  std::vector<float> cm(chunks), cl(chunks), cacc((size_t)chunks * d, 0.0f);
  for (int c = 0; c < chunks; ++c) {
    float m = tpj_neg_inf(), l = 0.0f;
    float* acc = &cacc[(size_t)c * d];
    int t = bounds[c];
    for (; t + 1 < bounds[c + 1]; t += 2) {
      const float sc[2] = {s[t], s[t + 1]};
      float p[2];
      const float corr = tpj_softmax_fold<2>(m, l, sc, p);
      for (int j = 0; j < d; ++j)
        acc[j] = acc[j] * corr + p[0] * v[(size_t)t * d + j] + p[1] * v[(size_t)(t + 1) * d + j];
    }
    if (t < bounds[c + 1]) {
      const float sc[1] = {s[t]};
      float p[1];
      const float corr = tpj_softmax_fold<1>(m, l, sc, p);
      for (int j = 0; j < d; ++j) acc[j] = acc[j] * corr + p[0] * v[(size_t)t * d + j];
    }
    cm[c] = m;
    cl[c] = l;
  }
  // Pairwise: fold every chunk state into a running one.
  float m = tpj_neg_inf(), l = 0.0f;
  std::vector<float> acc(d, 0.0f);
  for (int c = 0; c < chunks; ++c) {
    float c1, c2;
    tpj_softmax_merge2(m, l, cm[c], cl[c], c1, c2);
    for (int j = 0; j < d; ++j) acc[j] = acc[j] * c1 + cacc[(size_t)c * d + j] * c2;
  }
  std::vector<float> out_pair(d), out_w(d, 0.0f), w(chunks);
  for (int j = 0; j < d; ++j) out_pair[j] = acc[j] / l;
  tpj_merge_weights(cm.data(), cl.data(), chunks, 1, w.data());
  for (int c = 0; c < chunks; ++c)
    for (int j = 0; j < d; ++j) out_w[j] += w[c] * cacc[(size_t)c * d + j];
  write_all(out_pair);
  write_all(out_w);
}

static void mode_scales() {
  const int rows = read_int(), groups = read_int();
  const uint32_t groups_padded = (uint32_t)((groups + 3) / 4 * 4);
  std::vector<uint32_t> out;
  for (int r = 0; r < rows; ++r)
    for (int g = 0; g < groups; ++g) out.push_back(tpj_block_scale_offset(r, g, groups_padded));
  write_all(out);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: host_driver decode|encode|packed|softmax|scales < input > output\n");
    return 2;
  }
  const std::string_view mode = argv[1];
  if (mode == "decode") mode_decode();
  else if (mode == "encode") mode_encode();
  else if (mode == "packed") mode_packed();
  else if (mode == "softmax") mode_softmax();
  else if (mode == "scales") mode_scales();
  else {
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
  }
  return 0;
}
