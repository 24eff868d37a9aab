// LowBit: fused int8 Linear for x86 CPUs with AVX512-VNNI (kernels/vnni.py builds and loads it).
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
// Weight layout (pack): int8 [NB, K4, 16, 4], NB = ceil(N / 16), K4 = ceil(K / 4), zero padded: block nb, step k4
// holds w[nb*16 + j, k4*4 + i] at [j][i], the operand order of vpdpbusd (16 int32 lanes, each a 4-term u8 x s8 dot).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRowBlock = 32;  // rows whose codes are made together (one parallel task)
constexpr int kMR = 4;             // rows per register tile
enum Post { kNone = 0, kGelu = 1, kGeluTanh = 2, kGeglu = 3 };

// e^x, 16 lanes: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), e^r by its degree-6 Taylor polynomial (relative
// error < 2e-7 there), times 2^n by scalef; |x| clamped to 88 (beyond, fp32's e^x is 0 or inf anyway)
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// GELU with erf: 0.5 y (1 + erf(y / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7)
inline __m512 gelu_ps(__m512 y) {
  const __m512 z = _mm512_mul_ps(y, _mm512_set1_ps(0.70710678118654752f));
  const __m512 a = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f),
                                                                     _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  // erf(|z|) = 1 - p e^(-z^2); 1 + erf(z) = 2 - p e^(-z^2) for z >= 0, p e^(-z^2) for z < 0
  const __m512 q = _mm512_mul_ps(p, exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)));
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(2.0f), q), q);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), y), one_plus);
}

// GELU with tanh: 0.5 y (1 + tanh(u)), u = sqrt(2 / pi) (y + 0.044715 y^3); 1 + tanh(u) = 2 - 2 / (e^(2u) + 1)
inline __m512 gelu_tanh_ps(__m512 y) {
  const __m512 y3 = _mm512_mul_ps(_mm512_mul_ps(y, y), y);
  __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(y3, _mm512_set1_ps(0.044715f), y), _mm512_set1_ps(0.79788456080286536f));
  u = _mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(-20.0f)), _mm512_set1_ps(20.0f));
  const __m512 e = exp_ps(_mm512_add_ps(u, u));
  const __m512 one_plus = _mm512_sub_ps(_mm512_set1_ps(2.0f),
                                        _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), y), one_plus);
}

inline __m512 apply_post(__m512 y, int post) {
  return post == kGelu ? gelu_ps(y) : (post == kGeluTanh ? gelu_tanh_ps(y) : y);
}

torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8, "pack: int8 [N, K] expected");
  auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), NB = (N + 15) / 16, K4 = (K + 3) / 4;
  auto out = torch::zeros({NB, K4, 16, 4}, torch::kInt8);
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      dst[(((n >> 4) * K4 + (k >> 2)) * 16 + (n & 15)) * 4 + (k & 3)] = src[n * K + k];
  return out;
}

struct Quant {
  __m512 inv, step, zp, max, zero;
  bool exact;
  Quant(float sx, float fzp, float fmax, bool ex)
      : inv(_mm512_set1_ps(1.0f / sx)), step(_mm512_set1_ps(sx)), zp(_mm512_set1_ps(fzp)),
        max(_mm512_set1_ps(fmax)), zero(_mm512_setzero_ps()), exact(ex) {}
  // 16 codes (as int32 lanes) of 16 values
  inline __m512i operator()(__m512 x) const {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    // fused: one rounding of x * (1/sx) + zp; exact: x / sx rounded (half to even), then + zp (integers: exact)
    __m512 v = exact ? _mm512_add_ps(_mm512_roundscale_ps(_mm512_div_ps(x, step), kRound), zp)
                     : _mm512_roundscale_ps(_mm512_fmadd_ps(x, inv, zp), kRound);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, zero), max));
  }
};

inline void quantize_row(const float* x, uint8_t* q, int64_t K, int64_t Kp, const Quant& quant) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(quant(_mm512_loadu_ps(x + k))));
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(quant(_mm512_maskz_loadu_ps(m, x + k))));
    k = K;
  }
  for (; k < Kp; ++k) q[k] = 0;  // padding: zero codes meet zero weights
}

// rows [r0, r0 + rows) x column block nb: acc tiles of up to kMR rows, then the epilogue
template <int MR>
inline void tile(const uint8_t* q, int64_t Kp, const int8_t* wb, int64_t K4, __m512i zws, __m512 scale, __m512 bias,
                 float* out, int64_t ldo, __mmask16 mask, int post) {
  __m512i acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const __m512i b = _mm512_loadu_si512(wb + k4 * 64);
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, q + r * Kp + k4 * 4, 4);
      acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(a4), b);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], zws));
    _mm512_mask_storeu_ps(out + r * ldo, mask, apply_post(_mm512_fmadd_ps(f, scale, bias), post));
  }
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, const torch::Tensor& rowsum,
                     const torch::Tensor& sw, const c10::optional<torch::Tensor>& bias, int64_t N, double sx,
                     int64_t zp, int64_t qmax, bool exact, int64_t post) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(wp.dim() == 4 && wp.scalar_type() == torch::kInt8 && wp.size(2) == 16 && wp.size(3) == 4,
              "wp: packed int8 [NB, K4, 16, 4]");
  const int64_t M = x.size(0), K = x.size(1), NB = wp.size(0), K4 = wp.size(1), Kp = K4 * 4;
  TORCH_CHECK(K4 == (K + 3) / 4 && NB == (N + 15) / 16, "wp does not match K / N");
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
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t work = kRowBlock * std::max<int64_t>(N, 1) * std::max<int64_t>(K, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / work);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> qbuf(static_cast<size_t>(kRowBlock * Kp) + 64);
    uint8_t* q = qbuf.data();
    std::vector<float> ybuf(geglu ? static_cast<size_t>(kRowBlock * N) : 0);  // GEGLU: the block's full y
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kRowBlock, rows = std::min(kRowBlock, M - m0);
      for (int64_t r = 0; r < rows; ++r) quantize_row(X + (m0 + r) * K, q + r * Kp, K, Kp, quant);
      for (int64_t nb = 0; nb < NB; ++nb) {
        const int64_t n0 = nb * 16;
        const int nn = static_cast<int>(std::min<int64_t>(16, N - n0));
        const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1u);
        const __m512i zws = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(mask, RS + n0), _mm512_set1_epi32(zp));
        const __m512 scale = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, SW + n0), _mm512_set1_ps(fsx));
        const __m512 bv = B ? _mm512_maskz_loadu_ps(mask, B + n0) : _mm512_setzero_ps();
        const int8_t* wb = W + nb * K4 * 64;
        float* ob = geglu ? ybuf.data() + n0 : O + m0 * N + n0;
        const int p = geglu ? static_cast<int>(kNone) : static_cast<int>(post);
        int64_t r = 0;
        for (; r + kMR <= rows; r += kMR) tile<kMR>(q + r * Kp, Kp, wb, K4, zws, scale, bv, ob + r * N, N, mask, p);
        for (; r < rows; ++r) tile<1>(q + r * Kp, Kp, wb, K4, zws, scale, bv, ob + r * N, N, mask, p);
      }
      if (geglu) {  // out = a * gelu(g), a and g the halves of the block's y (still in cache)
        for (int64_t r = 0; r < rows; ++r) {
          const float* y = ybuf.data() + r * N;
          float* o = O + (m0 + r) * No;
          for (int64_t j = 0; j < No; j += 16) {
            const int nn = static_cast<int>(std::min<int64_t>(16, No - j));
            const __mmask16 m = static_cast<__mmask16>((1u << nn) - 1u);
            const __m512 a = _mm512_maskz_loadu_ps(m, y + j), g = _mm512_maskz_loadu_ps(m, y + No + j);
            _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(a, gelu_ps(g)));
          }
        }
      }
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "int8 [N, K] -> VNNI layout [ceil(N/16), ceil(K/4), 16, 4]");
  m.def("linear", &linear, "fused static-activation int8 Linear (fp32 in, fp32 out)");
  m.def("codes", &codes, "uint8 activation codes of fp32 [M, K]");
  m.def("post", [](const torch::Tensor& y, int64_t post) {  // the epilogue's activation alone (tests)
    TORCH_CHECK(y.dim() == 1 && y.scalar_type() == torch::kFloat && y.is_contiguous() && post >= 0 && post <= 2, "y");
    auto out = torch::empty_like(y);
    for (int64_t j = 0; j < y.numel(); j += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, y.numel() - j)) - 1u);
      _mm512_mask_storeu_ps(out.data_ptr<float>() + j, m,
                            apply_post(_mm512_maskz_loadu_ps(m, y.data_ptr<float>() + j), static_cast<int>(post)));
    }
    return out;
  });
}
