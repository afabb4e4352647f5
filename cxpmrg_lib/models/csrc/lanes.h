// Lane-wise float/double math of the compiled CPU kernels (selective_scan.cpp, fused_ops.cpp): one GCC
// vector of lanes per machine register, and the vectorisable exp, softplus and sigmoid they share.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace cxpmrg {

// Lanes of one block are one GCC vector, one register of the machine: 16 floats or 8 doubles with
// AVX-512, 8 floats or 4 doubles with AVX2 only. The vector extension makes the vectorisation explicit
// instead of hoping the auto-vectoriser takes the exp's branches and bit casts. (64-byte vectors on
// an AVX2 CPU, two registers each, left the 16 states no room: the recurrence spilled, and shuffles
// across the two halves did not map onto instructions. On an AVX2-only EPYC the 4-way encoder's
// scan then took 64% of its training step, and the compiled kernel was 1.4x the pure-PyTorch one.)
#if defined(__AVX512F__)
#define CXPMRG_VBYTES 64
#else
#define CXPMRG_VBYTES 32
#endif
typedef float vf __attribute__((vector_size(CXPMRG_VBYTES)));
typedef int32_t vi __attribute__((vector_size(CXPMRG_VBYTES)));
typedef double vd __attribute__((vector_size(CXPMRG_VBYTES)));
typedef int64_t vl __attribute__((vector_size(CXPMRG_VBYTES)));

template <typename T> struct Lanes;
template <> struct Lanes<float> { static constexpr int W = CXPMRG_VBYTES / 4; using V = vf; };
template <> struct Lanes<double> { static constexpr int W = CXPMRG_VBYTES / 8; using V = vd; };

// ---------------------------------------------------------------- lane-wise math
// exp2 of float lanes: 2^x = 2^k 2^f with k = round(x), f in [-1/2, 1/2], 2^f by its degree-6
// Taylor polynomial (relative error below 1e-7: under one float ulp). With AVX-512 the rounding
// and the scaling by 2^k are single instructions (vrndscaleps, vscalefps: no bit tricks, exact
// overflow to inf and underflow to 0); elsewhere the same through integer bits, clamped.
// No -ffast-math: the rest of the kernel keeps IEEE semantics. double: libm, exactly (the double
// kernel is for gradcheck and float64 users).
constexpr float LOG2E = 1.44269504088896341f;

// 2^f for f in [-1/2, 1/2]: the degree-6 Taylor polynomial of exp(f ln 2)
inline vf exp2_frac(vf f) {
  vf p = vf{} + 1.5403530393381609e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  return p * f + 1.0f;
}

inline vf exp2_v(vf x) {
#if defined(__AVX512F__)
  const __m512 k = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (vf)_mm512_scalef_ps((__m512)exp2_frac(x - (vf)k), k);
#else
  const vf lo = vf{} - 126.0f, hi = vf{} + 127.0f;
  const vf under = x < lo ? vf{} + 0.0f : vf{} + 1.0f;  // below 2^-126: 0 (as a flush)
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vi k = __builtin_convertvector(x + 128.5f, vi) - 128;  // round(x), x + 128.5 > 0
  const vi bits = (k + 127) << 23;
  return exp2_frac(x - __builtin_convertvector(k, vf)) * reinterpret_cast<const vf&>(bits) * under;
#endif
}

inline vf exp_v(vf v) { return exp2_v(v * LOG2E); }

inline vd exp_v(vd v) {
  for (int w = 0; w < Lanes<double>::W; ++w) v[w] = std::exp(v[w]);
  return v;
}

// exp(dt * A) with A given as the kernel keeps it: pre-scaled by log2(e) for float
inline vf exp_scaled(vf dt, vf a2) { return exp2_v(dt * a2); }
inline vd exp_scaled(vd dt, vd a) { return exp_v(dt * a); }
template <typename T> constexpr T exp_scale() { return std::is_same<T, float>::value ? T(LOG2E) : T(1); }

// softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(e) for e in (0, 1] as 2 atanh(e / (2 + e)),
// an odd series in s <= 1/3 (eight terms: error below 1e-9). Beyond 20 it is x (torch's threshold).
inline vf softplus_v(vf x) {
  const vf zero = vf{};
  const vf e = exp_v(x < zero ? x : -x);
  const vf s = e / (2.0f + e);
  const vf s2 = s * s;
  vf q = zero + 1.0f / 15.0f;
  q = q * s2 + 1.0f / 13.0f;
  q = q * s2 + 1.0f / 11.0f;
  q = q * s2 + 1.0f / 9.0f;
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 1.0f / 5.0f;
  q = q * s2 + 1.0f / 3.0f;
  q = q * s2 + 1.0f;
  const vf sp = (x > zero ? x : zero) + 2.0f * s * q;
  return x > 20.0f ? x : sp;
}

inline vd softplus_v(vd x) {
  for (int w = 0; w < Lanes<double>::W; ++w) x[w] = x[w] > 20.0 ? x[w] : std::log1p(std::exp(x[w]));
  return x;
}

template <typename V>
inline V sigmoid_v(V x) {
  const V one = V{} + 1;
  return one / (one + exp_v(-x));
}

}  // namespace cxpmrg
