// LowBit: fused int8 Linear for x86 CPUs with VNNI (kernels/vnni.py builds and loads it).
//
// out[m, n] = sx * sw[n] * (acc[m, n] - zp * rowsum[n]) + bias[n],   acc = sum_k q[m, k] * w[n, k]
// q[m, k]   = clamp(nearbyint(fma(x[m, k], 1 / sx, zp)), 0, qmax)     (uint8; the codes of kernels/cpu.py's fused
//                                                                      quantizer, torch.quantize_per_tensor)
//           or, exact = true, clamp(nearbyint(x[m, k] / sx) + zp, 0, qmax) (the reference's codes, kernels/eager.py)
// One pass over x and one over out: the activation codes of a block of rows are made in a small buffer and used at
// once, the int32 sums never leave registers, and the epilogue writes fp32 directly, with an activation applied
// there when asked (post: 0 none, 1 GELU (erf), 2 GELU (tanh), 3 GEGLU: out[:, j] = y[:, j] * gelu(y[:, j + N/2]),
// the block's y kept in a small buffer; kernels/post.py names them).
//
// Two builds of this file (kernels/vnni.py picks the one the CPU runs): AVX512-VNNI, 16 int32 lanes (default), and
// with LOWBIT_V256 AVX2 + AVX-VNNI, 8 lanes (Intel's client CPUs from Alder Lake on have AVX-VNNI, not AVX512).
// The algorithm is written once over the small vector layer below (namespace v).
//
// Weight layout (pack): int8 [NB, K4, L, 4], L the lane count, NB = ceil(N / L), K4 = ceil(K / 4), zero padded:
// block nb, step k4 holds w[nb*L + j, k4*4 + i] at [j][i], the operand order of vpdpbusd (L int32 lanes, each a
// 4-term u8 x s8 dot product).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

namespace v {
#if defined(LOWBIT_V256)
constexpr int L = 8;
using F = __m256;
using I = __m256i;
struct Tail {  // the first n lanes
  I m;
  int n;
};
inline Tail tail(int n) {
  alignas(32) static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones + 8 - n)), n};
}
inline F load(const float* p) { return _mm256_loadu_ps(p); }
inline F load(const float* p, const Tail& t) { return _mm256_maskload_ps(p, t.m); }
inline void store(float* p, F x, const Tail& t) { _mm256_maskstore_ps(p, t.m, x); }
inline I loadi(const int32_t* p, const Tail& t) { return _mm256_maskload_epi32(p, t.m); }
inline I loadw(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline F set1(float a) { return _mm256_set1_ps(a); }
inline I set1i(int32_t a) { return _mm256_set1_epi32(a); }
inline F zero() { return _mm256_setzero_ps(); }
inline I zeroi() { return _mm256_setzero_si256(); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F div(F a, F b) { return _mm256_div_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
inline F min(F a, F b) { return _mm256_min_ps(a, b); }
inline F max(F a, F b) { return _mm256_max_ps(a, b); }
inline F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline F round_even(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F neg_blend(F z, F if_neg, F if_not) {  // per lane: z < 0 ? if_neg : if_not
  return _mm256_blendv_ps(if_not, if_neg, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ));
}
inline F scale2n(F p, F n) {  // p * 2^n, n integral in [-127, 127] (the exponent field built directly)
  const I e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline I toi(F a) { return _mm256_cvtps_epi32(a); }
inline F tof(I a) { return _mm256_cvtepi32_ps(a); }
inline I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
inline I addi(I a, I b) { return _mm256_add_epi32(a, b); }
inline I mulloi(I a, I b) { return _mm256_mullo_epi32(a, b); }
inline I dot(I acc, I a, I b) { return _mm256_dpbusd_avx_epi32(acc, a, b); }
inline void store_codes(uint8_t* q, I c, int n) {  // n <= L uint8 codes (values already in 0..255)
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));  // 8 x u16
  const __m128i b = _mm_packus_epi16(w, w);                                                      // 8 x u8 (twice)
  if (n == L) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q), b);
  } else {
    alignas(16) uint8_t t[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(t), b);
    std::memcpy(q, t, n);
  }
}
#else
constexpr int L = 16;
using F = __m512;
using I = __m512i;
struct Tail {
  __mmask16 m;
  int n;
};
inline Tail tail(int n) { return {static_cast<__mmask16>((1u << n) - 1u), n}; }
inline F load(const float* p) { return _mm512_loadu_ps(p); }
inline F load(const float* p, const Tail& t) { return _mm512_maskz_loadu_ps(t.m, p); }
inline void store(float* p, F x, const Tail& t) { _mm512_mask_storeu_ps(p, t.m, x); }
inline I loadi(const int32_t* p, const Tail& t) { return _mm512_maskz_loadu_epi32(t.m, p); }
inline I loadw(const int8_t* p) { return _mm512_loadu_si512(p); }
inline F set1(float a) { return _mm512_set1_ps(a); }
inline I set1i(int32_t a) { return _mm512_set1_epi32(a); }
inline F zero() { return _mm512_setzero_ps(); }
inline I zeroi() { return _mm512_setzero_si512(); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F div(F a, F b) { return _mm512_div_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
inline F min(F a, F b) { return _mm512_min_ps(a, b); }
inline F max(F a, F b) { return _mm512_max_ps(a, b); }
inline F abs(F a) { return _mm512_abs_ps(a); }
inline F round_even(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F neg_blend(F z, F if_neg, F if_not) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), if_not, if_neg);
}
inline F scale2n(F p, F n) { return _mm512_scalef_ps(p, n); }
inline I toi(F a) { return _mm512_cvtps_epi32(a); }
inline F tof(I a) { return _mm512_cvtepi32_ps(a); }
inline I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
inline I addi(I a, I b) { return _mm512_add_epi32(a, b); }
inline I mulloi(I a, I b) { return _mm512_mullo_epi32(a, b); }
inline I dot(I acc, I a, I b) { return _mm512_dpbusd_epi32(acc, a, b); }
inline void store_codes(uint8_t* q, I c, int n) {
  _mm_mask_storeu_epi8(q, static_cast<__mmask16>((1u << n) - 1u), _mm512_cvtepi32_epi8(c));
}
#endif
}  // namespace v

constexpr int64_t kRowBlock = 32;  // rows whose codes are made together (one parallel task)
constexpr int kMR = 4;             // rows per register tile
enum Post { kNone = 0, kGelu = 1, kGeluTanh = 2, kGeglu = 3 };

// e^x: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), e^r by its degree-6 Taylor polynomial (relative error
// < 2e-7 there), times 2^n; |x| clamped to 88 (beyond, fp32's e^x is 0 or inf anyway)
inline v::F exp_ps(v::F x) {
  x = v::min(v::max(x, v::set1(-88.0f)), v::set1(88.0f));
  const v::F n = v::round_even(v::mul(x, v::set1(1.44269504088896341f)));
  v::F r = v::fnmadd(n, v::set1(0.693359375f), x);
  r = v::fnmadd(n, v::set1(-2.12194440e-4f), r);
  v::F p = v::set1(1.0f / 720);
  p = v::fmadd(p, r, v::set1(1.0f / 120));
  p = v::fmadd(p, r, v::set1(1.0f / 24));
  p = v::fmadd(p, r, v::set1(1.0f / 6));
  p = v::fmadd(p, r, v::set1(0.5f));
  p = v::fmadd(p, r, v::set1(1.0f));
  p = v::fmadd(p, r, v::set1(1.0f));
  return v::scale2n(p, n);
}

// GELU with erf: 0.5 y (1 + erf(y / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7)
inline v::F gelu_ps(v::F y) {
  const v::F z = v::mul(y, v::set1(0.70710678118654752f));
  const v::F a = v::abs(z);
  const v::F t = v::div(v::set1(1.0f), v::fmadd(a, v::set1(0.3275911f), v::set1(1.0f)));
  v::F p = v::set1(1.061405429f);
  p = v::fmadd(p, t, v::set1(-1.453152027f));
  p = v::fmadd(p, t, v::set1(1.421413741f));
  p = v::fmadd(p, t, v::set1(-0.284496736f));
  p = v::fmadd(p, t, v::set1(0.254829592f));
  p = v::mul(p, t);
  // erf(|z|) = 1 - p e^(-z^2); 1 + erf(z) = 2 - p e^(-z^2) for z >= 0, p e^(-z^2) for z < 0
  const v::F q = v::mul(p, exp_ps(v::mul(v::sub(v::zero(), a), a)));
  const v::F one_plus = v::neg_blend(z, q, v::sub(v::set1(2.0f), q));
  return v::mul(v::mul(v::set1(0.5f), y), one_plus);
}

// GELU with tanh: 0.5 y (1 + tanh(u)), u = sqrt(2 / pi) (y + 0.044715 y^3); 1 + tanh(u) = 2 - 2 / (e^(2u) + 1)
inline v::F gelu_tanh_ps(v::F y) {
  const v::F y3 = v::mul(v::mul(y, y), y);
  v::F u = v::mul(v::fmadd(y3, v::set1(0.044715f), y), v::set1(0.79788456080286536f));
  u = v::min(v::max(u, v::set1(-20.0f)), v::set1(20.0f));
  const v::F e = exp_ps(v::add(u, u));
  const v::F one_plus = v::sub(v::set1(2.0f), v::div(v::set1(2.0f), v::add(e, v::set1(1.0f))));
  return v::mul(v::mul(v::set1(0.5f), y), one_plus);
}

inline v::F apply_post(v::F y, int post) {
  return post == kGelu ? gelu_ps(y) : (post == kGeluTanh ? gelu_tanh_ps(y) : y);
}

torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8, "pack: int8 [N, K] expected");
  auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), NB = (N + v::L - 1) / v::L, K4 = (K + 3) / 4;
  auto out = torch::zeros({NB, K4, v::L, 4}, torch::kInt8);
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      dst[(((n / v::L) * K4 + (k >> 2)) * v::L + (n % v::L)) * 4 + (k & 3)] = src[n * K + k];
  return out;
}

struct Quant {
  v::F inv, step, zp, max;
  bool exact;
  Quant(float sx, float fzp, float fmax, bool ex)
      : inv(v::set1(1.0f / sx)), step(v::set1(sx)), zp(v::set1(fzp)), max(v::set1(fmax)), exact(ex) {}
  // L codes (as int32 lanes) of L values
  inline v::I operator()(v::F x) const {
    // fused: one rounding of x * (1/sx) + zp; exact: x / sx rounded (half to even), then + zp (integers: exact)
    const v::F y = exact ? v::add(v::round_even(v::div(x, step)), zp) : v::round_even(v::fmadd(x, inv, zp));
    return v::toi(v::min(v::max(y, v::zero()), max));
  }
};

inline void quantize_row(const float* x, uint8_t* q, int64_t K, int64_t Kp, const Quant& quant) {
  int64_t k = 0;
  for (; k + v::L <= K; k += v::L) v::store_codes(q + k, quant(v::load(x + k)), v::L);
  if (k < K) {
    const v::Tail t = v::tail(static_cast<int>(K - k));
    v::store_codes(q + k, quant(v::load(x + k, t)), t.n);
    k = K;
  }
  for (; k < Kp; ++k) q[k] = 0;  // padding: zero codes meet zero weights
}

// rows [r, r + MR) x one column block: the int32 sums, then the epilogue. KU independent sums per row over
// interleaved k steps (one row alone would otherwise wait on each vpdpbusd's latency), added at the end.
template <int MR, int KU>
inline void tile(const uint8_t* q, int64_t Kp, const int8_t* wb, int64_t K4, v::I zws, v::F scale, v::F bias,
                 float* out, int64_t ldo, const v::Tail& cols, int post) {
  v::I acc[MR][KU];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < KU; ++u) acc[r][u] = v::zeroi();
  int64_t k4 = 0;
  for (; k4 + KU <= K4; k4 += KU) {
    for (int u = 0; u < KU; ++u) {
      const v::I b = v::loadw(wb + (k4 + u) * 4 * v::L);
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        std::memcpy(&a4, q + r * Kp + (k4 + u) * 4, 4);
        acc[r][u] = v::dot(acc[r][u], v::set1i(a4), b);
      }
    }
  }
  for (; k4 < K4; ++k4) {
    const v::I b = v::loadw(wb + k4 * 4 * v::L);
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, q + r * Kp + k4 * 4, 4);
      acc[r][0] = v::dot(acc[r][0], v::set1i(a4), b);
    }
  }
  for (int r = 0; r < MR; ++r) {
    v::I sum = acc[r][0];
    for (int u = 1; u < KU; ++u) sum = v::addi(sum, acc[r][u]);
    const v::F f = v::tof(v::subi(sum, zws));
    v::store(out + r * ldo, apply_post(v::fmadd(f, scale, bias), post), cols);
  }
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, const torch::Tensor& rowsum,
                     const torch::Tensor& sw, const c10::optional<torch::Tensor>& bias, int64_t N, double sx,
                     int64_t zp, int64_t qmax, bool exact, int64_t post) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(wp.dim() == 4 && wp.scalar_type() == torch::kInt8 && wp.size(2) == v::L && wp.size(3) == 4,
              "wp: packed int8 [NB, K4, L, 4] of this build's lane count");
  const int64_t M = x.size(0), K = x.size(1), NB = wp.size(0), K4 = wp.size(1), Kp = K4 * 4;
  TORCH_CHECK(K4 == (K + 3) / 4 && NB == (N + v::L - 1) / v::L, "wp does not match K / N");
  TORCH_CHECK(rowsum.numel() == N && rowsum.scalar_type() == torch::kInt && sw.numel() == N &&
              sw.scalar_type() == torch::kFloat, "rowsum int32 [N], sw fp32 [N]");
  TORCH_CHECK(zp >= 0 && zp <= qmax && qmax <= 255 && qmax >= 1 && sx > 0, "activation zero point / range");
  TORCH_CHECK(post >= kNone && post <= kGeglu && (post != kGeglu || N % 2 == 0), "post: 0..3, GEGLU with even N");
  const float* B = nullptr;
  torch::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.numel() == N && bc.scalar_type() == torch::kFloat, "bias: fp32 [N]");
    B = bc.data_ptr<float>();
  }
  const bool geglu = post == kGeglu;
  const int64_t No = geglu ? N / 2 : N;  // output features
  auto out = torch::empty({M, No}, x.options());
  auto rs = rowsum.contiguous();
  auto swc = sw.contiguous();
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int8_t* W = wp.data_ptr<int8_t>();
  const int32_t* RS = rs.data_ptr<int32_t>();
  const float* SW = swc.data_ptr<float>();
  const float fsx = static_cast<float>(sx);
  // (fused: as torch.quantize_per_tensor, the reciprocal of the fp32 step, then one fma per value)
  const Quant quant(fsx, static_cast<float>(zp), static_cast<float>(qmax), exact);
  const int post_in_tile = geglu ? static_cast<int>(kNone) : static_cast<int>(post);
  // column blocks [nb0, nb1) of the rows [m0, m0 + rows), whose codes are at q (rows x Kp); GEGLU's y block at ybuf
  auto columns = [&](const uint8_t* q, int64_t m0, int64_t rows, int64_t nb0, int64_t nb1, float* ybuf) {
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = nb * v::L;
      const v::Tail cols = v::tail(static_cast<int>(std::min<int64_t>(v::L, N - n0)));
      const v::I zws = v::mulloi(v::loadi(RS + n0, cols), v::set1i(static_cast<int32_t>(zp)));
      const v::F scale = v::mul(v::load(SW + n0, cols), v::set1(fsx));
      const v::F bv = B ? v::load(B + n0, cols) : v::zero();
      const int8_t* wb = W + nb * K4 * 4 * v::L;
      float* ob = geglu ? ybuf + n0 : O + m0 * N + n0;
      int64_t r = 0;
      for (; r + kMR <= rows; r += kMR)
        tile<kMR, 1>(q + r * Kp, Kp, wb, K4, zws, scale, bv, ob + r * N, N, cols, post_in_tile);
      for (; r < rows; ++r) tile<1, 4>(q + r * Kp, Kp, wb, K4, zws, scale, bv, ob + r * N, N, cols, post_in_tile);
    }
  };
  auto geglu_rows = [&](const float* ybuf, int64_t m0, int64_t rows) {  // out = a * gelu(g) over y's halves
    for (int64_t r = 0; r < rows; ++r) {
      const float* y = ybuf + r * N;
      float* o = O + (m0 + r) * No;
      for (int64_t j = 0; j < No; j += v::L) {
        const v::Tail t = v::tail(static_cast<int>(std::min<int64_t>(v::L, No - j)));
        v::store(o + j, v::mul(v::load(y + j, t), gelu_ps(v::load(y + No + j, t))), t);
      }
    }
  };
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  if (blocks == 1 && !geglu && at::get_num_threads() > 1) {
    // few rows (a batch of vectors): quantize them once, split the columns between the threads instead
    std::vector<uint8_t> qbuf(static_cast<size_t>(M * Kp) + 64);
    for (int64_t r = 0; r < M; ++r) quantize_row(X + r * K, qbuf.data() + r * Kp, K, Kp, quant);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (std::max<int64_t>(K, 1) * v::L * M));
    at::parallel_for(0, NB, grain, [&](int64_t nb0, int64_t nb1) { columns(qbuf.data(), 0, M, nb0, nb1, nullptr); });
    return out;
  }
  const int64_t work = kRowBlock * std::max<int64_t>(N, 1) * std::max<int64_t>(K, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / work);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> qbuf(static_cast<size_t>(kRowBlock * Kp) + 64);
    std::vector<float> ybuf(geglu ? static_cast<size_t>(kRowBlock * N) : 0);  // GEGLU: the block's full y
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kRowBlock, rows = std::min(kRowBlock, M - m0);
      for (int64_t r = 0; r < rows; ++r) quantize_row(X + (m0 + r) * K, qbuf.data() + r * Kp, K, Kp, quant);
      columns(qbuf.data(), m0, rows, 0, NB, ybuf.data());
      if (geglu) geglu_rows(ybuf.data(), m0, rows);
    }
  });
  return out;
}

// the codes alone (tests: the same codes as torch.quantize_per_tensor)
torch::Tensor codes(const torch::Tensor& x, double sx, int64_t zp, int64_t qmax, bool exact) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, K}, torch::kUInt8);
  const Quant quant(static_cast<float>(sx), static_cast<float>(zp), static_cast<float>(qmax), exact);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, out.data_ptr<uint8_t>() + m * K, K, K, quant);
  return out;
}

// the epilogue's activation alone (tests)
torch::Tensor post_only(const torch::Tensor& y, int64_t post) {
  TORCH_CHECK(y.dim() == 1 && y.scalar_type() == torch::kFloat && y.is_contiguous() && post >= 0 && post <= 2, "y");
  auto out = torch::empty_like(y);
  for (int64_t j = 0; j < y.numel(); j += v::L) {
    const v::Tail t = v::tail(static_cast<int>(std::min<int64_t>(v::L, y.numel() - j)));
    v::store(out.data_ptr<float>() + j, apply_post(v::load(y.data_ptr<float>() + j, t), static_cast<int>(post)), t);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("lanes") = v::L;
  m.def("pack", &pack, "int8 [N, K] -> VNNI layout [ceil(N/L), ceil(K/4), L, 4]");
  m.def("linear", &linear, "fused static-activation int8 Linear (fp32 in, fp32 out)");
  m.def("codes", &codes, "uint8 activation codes of fp32 [M, K]");
  m.def("post", &post_only, "the epilogue's activation (1 GELU, 2 GELU-tanh) of fp32 [n]");
}
