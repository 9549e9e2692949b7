// Branch-free float exp/log and bf16/fp16 conversions that compilers vectorise.
//
// std::exp/std::log calls keep GCC from vectorising a loop (unless -ffast-math,
// which would also break the NaN/inf rules of SPEC §3). These are the classic
// Cephes single-precision range reductions and polynomials (about 1 ulp), with
// IEEE special values restored by selects.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace caad {

// The kernels build with -ffp-contract=off so that x·(1/τ) − max rounds exactly as the
// stored statistics did (an implicit FMA there skews log-probabilities at |x| ~ 1e4, and
// makes results differ between hosts). The polynomials below opt back in explicitly.
inline float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The range reduction and polynomial of the exps below: exp(x) = y·2^n with n = round(x / ln 2)
// (the 1.5·2^23 trick) and y = exp(r), r = x − n·ln 2 (ln 2 split in two parts so r is exact).
// The reduction uses FMAs where the target has them.
inline float exp_reduced(float x, int32_t& n) {
  float fn = madd(x, 1.44269504088896341f, 12582912.f);
  fn = fn - 12582912.f;
  float r = madd(fn, -0.693359375f, x);
  r = madd(fn, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  n = static_cast<int32_t>(fn);
  return madd(p, r * r, r) + 1.f;
}

constexpr float kExpLo = -87.33654475f;  // exp(kExpLo) = 2^-126, the smallest normal float

// exp(x) for x <= 88 (every argument here is x - max <= 0): 0 below the smallest normal (and for
// -inf), NaN for NaN, +inf above 88.
// No clamp of x before the reduction: the two selects at the end replace every out-of-range result
// (and NaN propagates through the arithmetic), and a clamp in front made GCC specialise the whole
// polynomial per clamped path (8 blends per vector). n is clamped to [-127, 128] (integer min/max,
// no float select): far out of range the scale is 0 or 2^128-ish instead of wrapped exponent bits
// (never a subnormal); the selects then decide.
inline float fast_exp(float x) {
  int32_t n;
  float y = exp_reduced(x, n);
  n = n < -127 ? -127 : n;
  n = n > 128 ? 128 : n;
  y = y * bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  y = x < kExpLo ? 0.f : y;
  y = x > 88.0f ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// fast_exp for arguments that cannot exceed 0 by more than rounding (x − max with max taken over x,
// so x ≤ 0, −inf or NaN): the same result there, without the +inf select and the upper exponent
// clamp, which such arguments never reach (3 of ~22 instructions per vector).
inline float fast_exp_nonpos(float x) {
  int32_t n;
  float y = exp_reduced(x, n);
  n = n < -127 ? -127 : n;
  y = y * bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  return x < kExpLo ? 0.f : y;
}

// log(x) for x == 0, normal positive x, +inf and NaN (subnormal inputs do not
// occur here: the arguments are sums of exps with one term equal to 1, or 0).
inline float fast_log(float x) {
  uint32_t bits = float_to_bits(x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;  // x = m·2^e, m in [0.5, 1)
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
  bool small = m < 0.707106781186547524f;
  float fe = static_cast<float>(e) - (small ? 1.f : 0.f);
  float xm = small ? (m + m - 1.f) : (m - 1.f);
  float z = xm * xm;
  float y = 7.0376836292e-2f;
  y = madd(y, xm, -1.1514610310e-1f);
  y = madd(y, xm, 1.1676998740e-1f);
  y = madd(y, xm, -1.2420140846e-1f);
  y = madd(y, xm, 1.4249322787e-1f);
  y = madd(y, xm, -1.6668057665e-1f);
  y = madd(y, xm, 2.0000714765e-1f);
  y = madd(y, xm, -2.4999993993e-1f);
  y = madd(y, xm, 3.3333331174e-1f);
  y = y * xm * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  float r = xm + y;
  r += 0.693359375f * fe;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  r = x == 0.f ? -kInf : r;
  r = x == kInf ? kInf : r;
  r = (x < 0.f || x != x) ? std::numeric_limits<float>::quiet_NaN() : r;
  return r;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}

}  // namespace caad
