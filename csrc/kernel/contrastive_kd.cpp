// CPU row kernels of the contrastive KD loss (see contrastive_kd.h for the passes).
#include "contrastive_kd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "fast_math.h"

namespace caad {
namespace {

constexpr int64_t kBlock = 512;  // entries per stack buffer: 2 KiB in fp32, L1-resident

template <typename Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

// exp/log of the accumulation type: vectorisable polynomials in fp32, libm in fp64
// (the float64 path exists for gradcheck and exact parity, not for speed).
inline float vexp(float x) { return fast_exp(x); }
inline double vexp(double x) { return std::exp(x); }
inline float vlog(float x) { return fast_log(x); }
inline double vlog(double x) { return std::log(x); }

// log(exp x + exp y); -inf when both are -inf.
template <typename Acc>
inline Acc log_add_exp_t(Acc x, Acc y) {
  Acc mx = x > y ? x : y;
  Acc mx_safe = mx == kNegInf<Acc> ? Acc(0) : mx;
  return mx_safe + vlog(vexp(x - mx_safe) + vexp(y - mx_safe));
}

#if defined(__FLT16_MAX__)
inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof v);
  return static_cast<float>(v);
}
inline uint16_t float_to_half(float f) {
  _Float16 v = static_cast<_Float16>(f);  // hardware round-to-nearest-even
  uint16_t h;
  std::memcpy(&h, &v, sizeof h);
  return h;
}
#else
// Portable IEEE binary16 conversions for compilers without _Float16.
inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  float a = std::fabs(f);
  if (a != a) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 65520.f) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a < 6.103515625e-05f) {  // subnormal half: round a·2^24 to nearest even
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.f)));
  }
  uint32_t au = float_to_bits(a);
  uint32_t rounded = au + 0xfffu + ((au >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded >> 13) - (112u << 10)));
}
#endif

// Converts n entries starting at element `offset` of a row into fp32.
template <typename Acc>
void load_block(const Row& row, int64_t offset, int64_t n, Acc* out) {
  switch (row.dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
      break;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Acc>(p[i]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
      break;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(p[i]);
      break;
    }
  }
}

// A block of a row as Acc values: the row's own memory when it is stored as Acc already
// (fp32 rows on the fast path: no copy), else converted into `buf`.
template <typename Acc>
const Acc* block_view(const Row& row, int64_t offset, int64_t n, Acc* buf) {
  constexpr DType kAcc = sizeof(Acc) == sizeof(float) ? DType::kFloat32 : DType::kFloat64;
  if (row.dtype == kAcc) return static_cast<const Acc*>(row.ptr) + offset;
  load_block(row, offset, n, buf);
  return buf;
}

template <typename Acc>
void store_block(void* dst, DType dtype, int64_t offset, int64_t n, const Acc* in) {
  switch (dtype) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(in[i]);
      break;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = in[i];
      break;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(static_cast<float>(in[i]));
      break;
    }
    case DType::kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_half(static_cast<float>(in[i]));
      break;
    }
  }
}

// `#pragma omp simd` lets the compiler vectorise the float reductions below: without
// it, IEEE addition order forbids it (and -ffast-math would break the inf/NaN rules).
#define CAAD_SIMD _Pragma("omp simd")
#define CAAD_SIMD_SUM(...) _Pragma(CAAD_STR(omp simd reduction(+ : __VA_ARGS__)))
#define CAAD_STR(x) #x

// Contrasted, masked, temperature-scaled teacher logits z/tau of one block and its
// maximum. Adds the block's share of the non-finite check (0, or NaN) to `chk`.
// TEXT and PLAUS are template flags so the loop body is branch-free (vectorisable).
template <typename Acc, bool TEXT, bool PLAUS>
Acc contrast_block_t(const Acc* a, const Acc* t, int64_t n, const KernelOptions& o, Acc threshold, Acc* zt,
                     Acc& chk) {
  const Acc alpha = static_cast<Acc>(o.alpha), one_plus = 1 + alpha, inv_tau = static_cast<Acc>(o.inv_tau);
  Acc c = 0, zmax = kNegInf<Acc>;
#pragma omp simd reduction(+ : c) reduction(max : zmax)
  for (int64_t i = 0; i < n; ++i) {
    const bool impossible = a[i] == kNegInf<Acc>;
    // NaN for NaN or +inf in a, and (with the text path) for any non-finite t under a finite a.
    const Acc bad = TEXT ? a[i] * Acc(0) + t[i] * Acc(0) : a[i] * Acc(0);
    c += impossible ? Acc(0) : bad;
    Acc z = TEXT ? one_plus * a[i] - alpha * t[i] : a[i];
    z = impossible ? kNegInf<Acc> : z;
    if (PLAUS) z = a[i] < threshold ? kNegInf<Acc> : z;
    zt[i] = z * inv_tau;
    zmax = zt[i] > zmax ? zt[i] : zmax;  // not std::max: its reference result defeats vectorisation
  }
  chk += c;
  return zmax;
}

template <typename Acc>
Acc contrast_block(const Acc* a, const Acc* t, int64_t n, const KernelOptions& o, Acc threshold, Acc* zt,
                   Acc& chk) {
  if (o.use_text) {
    return o.plausibility ? contrast_block_t<Acc, true, true>(a, t, n, o, threshold, zt, chk)
                          : contrast_block_t<Acc, true, false>(a, t, n, o, threshold, zt, chk);
  }
  return o.plausibility ? contrast_block_t<Acc, false, true>(a, t, n, o, threshold, zt, chk)
                        : contrast_block_t<Acc, false, false>(a, t, n, o, threshold, zt, chk);
}

template <typename Acc>
Acc block_max(const Acc* x, int64_t n) {
  Acc m = kNegInf<Acc>;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Running maximum of a streamed row: `raw` may be −inf, `safe` is the value the
// running sums are taken relative to (0 while raw is still −inf).
template <typename Acc>
struct RunningMax {
  Acc raw = kNegInf<Acc>;
  Acc safe = 0;
};

// Folds a block's maximum into m; returns the rescale factor exp(old raw − new safe)
// and the shift (new safe − old safe) that the running accumulators need.
template <typename Acc>
inline void advance(RunningMax<Acc>& m, Acc block_max_value, Acc& rescale, Acc& shift) {
  Acc raw = std::max(m.raw, block_max_value);
  Acc safe = raw == kNegInf<Acc> ? Acc(0) : raw;
  rescale = vexp(m.raw - safe);
  shift = safe - m.safe;
  m.raw = raw;
  m.safe = safe;
}

// e[i] = exp(x[i] − m); returns Σ e.
template <typename Acc>
Acc exp_block(const Acc* x, int64_t n, Acc m, Acc* e) {
  Acc sum = 0;
  CAAD_SIMD_SUM(sum)
  for (int64_t i = 0; i < n; ++i) {
    e[i] = vexp(x[i] - m);
    sum += e[i];
  }
  return sum;
}

// Σ e[i]·(x[i] − mx) and Σ e[i]·(y[i] − my) over entries with e > 0 (0·log 0 = 0), where
// x is the distribution the divergence weights by and y the other one. Entries in x's
// support (x > −inf) where y = −inf make KL = +inf, whatever their weight after rounding:
// they are counted in `infinite` and kept out of the sums (an order-independent rule; a
// −inf inside a running sum would turn into 0·(−inf) = NaN once its weight underflowed).
template <typename Acc>
void weighted_gaps(const Acc* e, const Acc* x, Acc mx, const Acc* y, Acc my, int64_t n, Acc& gx, Acc& gy,
                   Acc& infinite) {
  Acc sx = 0, sy = 0, inf_count = 0;
#pragma omp simd reduction(+ : sx, sy, inf_count)
  for (int64_t i = 0; i < n; ++i) {
    // No select on the sums (GCC turns those into masked loads and blends): a gap clamped at the
    // lowest finite value is exact wherever e > 0 (x − mx ≥ −745 there) and gives e·gap = 0 where
    // x = −inf (e = 0). Where y = −inf the y-gap is garbage but the entry counts as infinite,
    // which overrides the sum; where y = −inf and e = 0 it is 0·lowest = 0.
    constexpr Acc kLowest = std::numeric_limits<Acc>::lowest();
    const Acc dx = x[i] - mx, dy = y[i] - my;
    const Acc gap_x = dx > kLowest ? dx : kLowest;
    const Acc gap_y = dy > kLowest ? dy : kLowest;
    sx += e[i] * gap_x;
    sy += e[i] * gap_y;
    inf_count += x[i] != kNegInf<Acc> && y[i] == kNegInf<Acc> ? Acc(1) : Acc(0);
  }
  gx = sx;
  gy = sy;
  infinite += inf_count;
}

// What the forward keeps for a backward in the same call (forward_backward_row): each
// block's exp(s/τ − m_s) and exp(z/τ − m_z), relative to the running maxima m_s, m_z
// reached at that block, and those maxima ([vocab], [vocab], [blocks], [blocks]).
template <typename Acc>
struct RowCapture {
  Acc* exp_s;
  Acc* exp_z;
  Acc* max_s;
  Acc* max_z;
};

template <typename Acc>
Acc forward_row_impl(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                     const KernelOptions& o, Acc* stats, const RowCapture<Acc>* capture = nullptr) {
  using std::log;
  const Acc inv_tau = static_cast<Acc>(o.inv_tau);
  alignas(64) Acc sb[kBlock], st[kBlock], ab[kBlock], tb[kBlock], zt[kBlock], es[kBlock], ez[kBlock];
  Acc max_a = kNegInf<Acc>;
  if (o.soft && o.plausibility) {
    for (int64_t start = 0; start < vocab; start += kBlock) {
      const int64_t n = std::min(kBlock, vocab - start);
      max_a = std::max(max_a, block_max(block_view(a, start, n, ab), n));
    }
  }
  const Acc threshold = max_a + static_cast<Acc>(o.log_beta_p);

  // Online log-sum-exps, each sum relative to its safe running max. The KL
  // accumulators hold Σ e·(x − max_x) with x's own max, never Σ e·(z − s): at
  // |logits| ~ 1e4 that would cancel against the max gap and lose the loss to rounding.
  RunningMax<Acc> mz, ms, mh;
  Acc sum_z = 0, sum_s = 0, sum_h = 0;
  Acc acc_zz = 0, acc_zs = 0;  // forward KL = (acc_zz − acc_zs)/sum_z − log sum_z + log sum_s
  Acc acc_ss = 0, acc_sz = 0;  // reverse KL, mirrored
  Acc chk = 0;                 // stays 0 unless a NaN/+inf rule of SPEC §3 fires
  Acc infinite = 0;            // entries that make forward/reverse KL +inf (see weighted_gaps)
  for (int64_t start = 0, block = 0; start < vocab; start += kBlock, ++block) {
    const int64_t n = std::min(kBlock, vocab - start);
    const Acc* sp = block_view(s, start, n, sb);
    Acc* es_out = capture ? capture->exp_s + start : es;
    Acc* ez_out = capture ? capture->exp_z + start : ez;
    Acc smax = kNegInf<Acc>, c = 0;
#pragma omp simd reduction(+ : c) reduction(max : smax)
    for (int64_t i = 0; i < n; ++i) {
      c += sp[i] == kNegInf<Acc> ? Acc(0) : sp[i] * Acc(0);
      st[i] = sp[i] * inv_tau;
      smax = st[i] > smax ? st[i] : smax;
    }
    chk += c;
    Acc c_s, shift_s;
    advance(ms, smax, c_s, shift_s);
    const Acc block_sum_s = exp_block(st, n, ms.safe, es_out);
    if (capture) capture->max_s[block] = ms.safe;
    if (o.soft) {
      const Acc* ap = block_view(a, start, n, ab);
      const Acc* tp = o.use_text ? block_view(t, start, n, tb) : ap;  // read only with the text path
      Acc c_z, shift_z;
      advance(mz, contrast_block(ap, tp, n, o, threshold, zt, chk), c_z, shift_z);
      const Acc block_sum_z = exp_block(zt, n, mz.safe, ez_out);
      if (capture) capture->max_z[block] = mz.safe;
      Acc gx, gy;
      if (o.divergence == kForwardKL) {
        weighted_gaps(ez_out, zt, mz.safe, st, ms.safe, n, gx, gy, infinite);
        acc_zz = c_z * (acc_zz - shift_z * sum_z) + gx;
        acc_zs = c_z * (acc_zs - shift_s * sum_z) + gy;
      } else if (o.divergence == kReverseKL) {
        weighted_gaps(es_out, st, ms.safe, zt, mz.safe, n, gx, gy, infinite);
        acc_ss = c_s * (acc_ss - shift_s * sum_s) + gx;
        acc_sz = c_s * (acc_sz - shift_z * sum_s) + gy;
      }
      sum_z = sum_z * c_z + block_sum_z;
    }
    sum_s = sum_s * c_s + block_sum_s;
    if (o.hard && !o.tau_one) {
      Acc c_h, shift_h;
      advance(mh, block_max(sp, n), c_h, shift_h);
      sum_h = sum_h * c_h + exp_block(sp, n, mh.safe, es);
    }
  }

  const Acc log_sum_z = log(sum_z), log_sum_s = log(sum_s);
  Acc loss = chk;
  Acc div_aux = 0;
  if (o.soft) {
    Acc div;
    const Acc inf = std::numeric_limits<Acc>::infinity();
    if (o.divergence == kForwardKL) {
      div = infinite > 0 ? inf : (acc_zz - acc_zs) / sum_z - (log_sum_z - log_sum_s);
    } else if (o.divergence == kReverseKL) {
      div = infinite > 0 ? inf : (acc_ss - acc_sz) / sum_s - (log_sum_s - log_sum_z);
      div_aux = div;
    } else {
      // Generalized JSD needs both normalisers before log m: a second pass.
      const Acc beta = static_cast<Acc>(o.jsd_beta);
      const Acc log_1m_beta = static_cast<Acc>(std::log1p(-o.jsd_beta));
      const Acc log_beta = static_cast<Acc>(std::log(o.jsd_beta));
      Acc kl_pm = 0, kl_qm = 0, unused = 0;
      for (int64_t start = 0; start < vocab; start += kBlock) {
        const int64_t n = std::min(kBlock, vocab - start);
        load_block(s, start, n, sb);
        load_block(a, start, n, ab);
        if (o.use_text) load_block(t, start, n, tb);
        contrast_block(ab, tb, n, o, threshold, zt, unused);
        Acc kp = 0, kq = 0;
        CAAD_SIMD_SUM(kp, kq)
        for (int64_t i = 0; i < n; ++i) {
          const Acc log_p = (zt[i] - mz.safe) - log_sum_z;
          const Acc log_q = (sb[i] * inv_tau - ms.safe) - log_sum_s;
          const Acc log_m = log_add_exp_t(log_q + log_1m_beta, log_p + log_beta);
          const Acc p = vexp(log_p), q = vexp(log_q);
          kp += p > 0 ? p * (log_p - log_m) : Acc(0);
          kq += q > 0 ? q * (log_q - log_m) : Acc(0);
        }
        kl_pm += kp;
        kl_qm += kq;
      }
      div = beta * kl_pm + (1 - beta) * kl_qm;
      div_aux = kl_qm;
    }
    // SPEC §3: a row with no distribution (all of s/τ, or all of z/τ, −inf) has no divergence.
    if (sum_s == 0 || sum_z == 0) div = std::numeric_limits<Acc>::quiet_NaN();
    loss += static_cast<Acc>(o.soft_weight) * div;
  }
  const Acc max_h = o.tau_one ? ms.safe : mh.safe;
  const Acc log_sum_h = o.tau_one ? log_sum_s : log(sum_h);
  if (o.hard) {
    Acc ce = std::numeric_limits<Acc>::quiet_NaN();
    if (label >= 0 && label < vocab) {
      Acc s_y;
      load_block(s, label, 1, &s_y);
      ce = (max_h - s_y) + log_sum_h;
    }
    loss += static_cast<Acc>(o.hard_weight) * ce;
  }
  stats[kMaxZ] = mz.safe;
  stats[kLogSumZ] = log_sum_z;
  stats[kMaxS] = ms.safe;
  stats[kLogSumS] = log_sum_s;
  stats[kMaxH] = max_h;
  stats[kLogSumH] = log_sum_h;
  stats[kMaxA] = max_a;
  stats[kDivAux] = div_aux;
  return loss;
}

template <typename Acc>
void backward_row_impl(Acc upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                       const KernelOptions& o, const Acc* stats, void* grad, DType grad_dtype) {
  alignas(64) Acc sb[kBlock], ab[kBlock], tb[kBlock], zt[kBlock], g[kBlock];
  const Acc inv_tau = static_cast<Acc>(o.inv_tau);
  const Acc max_z = stats[kMaxZ], log_sum_z = stats[kLogSumZ], max_s = stats[kMaxS];
  const Acc log_sum_s = stats[kLogSumS], max_h = stats[kMaxH], log_sum_h = stats[kLogSumH];
  const Acc threshold = stats[kMaxA] + static_cast<Acc>(o.log_beta_p);
  const Acc div_aux = stats[kDivAux];
  const Acc c_soft = upstream * static_cast<Acc>(o.soft_weight) * inv_tau;
  const Acc c_hard = upstream * static_cast<Acc>(o.hard_weight);
  const Acc beta = static_cast<Acc>(o.jsd_beta);
  const Acc log_1m_beta = static_cast<Acc>(std::log1p(-o.jsd_beta));
  const Acc log_beta = static_cast<Acc>(std::log(o.jsd_beta));
  Acc unused = 0;
  // Reverse KL / JSD: q·(r − D) cancels at the student's argmax when q saturates there (|x| ~ 1e3:
  // r ≈ D ≈ 1e3, an error of an ulp of 1e3 where the true gradient is ~1e-4). The soft gradient
  // sums to 0 exactly, so that one entry is written last as minus the sum of all the others.
  const bool compensate = o.soft && o.divergence != kForwardKL;
  int64_t arg = -1;                 // the first entry with s/τ = max_s: withheld until the end
  Acc soft_sum = 0, arg_soft = 0, arg_hard = 0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    load_block(s, start, n, sb);
    int64_t block_arg = -1;
    if (o.soft) {
      load_block(a, start, n, ab);
      if (o.use_text) load_block(t, start, n, tb);
      contrast_block(ab, tb, n, o, threshold, zt, unused);
      // One loop per divergence, so each is a straight-line vector loop.
      if (o.divergence == kForwardKL) {
        CAAD_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const Acc q = vexp((sb[i] * inv_tau - max_s) - log_sum_s);
          const Acc p = vexp((zt[i] - max_z) - log_sum_z);
          g[i] = c_soft * (q - p);
        }
      } else if (o.divergence == kReverseKL) {
        CAAD_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const Acc log_q = (sb[i] * inv_tau - max_s) - log_sum_s;
          const Acc log_p = (zt[i] - max_z) - log_sum_z;
          const Acc q = vexp(log_q);
          g[i] = c_soft * (q > 0 ? q * (log_q - log_p - div_aux) : Acc(0));
        }
      } else {
        CAAD_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const Acc log_q = (sb[i] * inv_tau - max_s) - log_sum_s;
          const Acc log_p = (zt[i] - max_z) - log_sum_z;
          const Acc q = vexp(log_q);
          const Acc log_m = log_add_exp_t(log_q + log_1m_beta, log_p + log_beta);
          g[i] = c_soft * (1 - beta) * (q > 0 ? q * (log_q - log_m - div_aux) : Acc(0));
        }
      }
    } else {
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] = 0;
    }
    if (compensate) {
      Acc block_sum = 0;
      CAAD_SIMD_SUM(block_sum)
      for (int64_t i = 0; i < n; ++i) block_sum += g[i];
      soft_sum += block_sum;
      for (int64_t i = 0; arg < 0 && i < n; ++i) {
        if (sb[i] * inv_tau == max_s) {
          arg = block_arg = start + i;
          arg_soft = g[i];
        }
      }
    }
    if (o.hard) {
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] += c_hard * vexp((sb[i] - max_h) - log_sum_h);
      if (label >= start && label < start + n) g[label - start] -= c_hard;
    }
    if (block_arg >= 0) arg_hard = g[block_arg - start] - arg_soft;
    store_block(grad, grad_dtype, start, n, g);
  }
  if (arg >= 0) {
    const Acc fixed = -(soft_sum - arg_soft) + arg_hard;
    store_block(grad, grad_dtype, arg, 1, &fixed);
  }
}

}  // namespace

float forward_row(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label, const KernelOptions& opts,
                  float* stats) {
  return forward_row_impl<float>(s, a, t, vocab, label, opts, stats);
}

double forward_row(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label, const KernelOptions& opts,
                   double* stats) {
  return forward_row_impl<double>(s, a, t, vocab, label, opts, stats);
}

void backward_row(float upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, const float* stats, void* grad, DType grad_dtype) {
  backward_row_impl<float>(upstream, s, a, t, vocab, label, opts, stats, grad, grad_dtype);
}

void backward_row(double upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, const double* stats, void* grad, DType grad_dtype) {
  backward_row_impl<double>(upstream, s, a, t, vocab, label, opts, stats, grad, grad_dtype);
}

int64_t forward_backward_workspace(int64_t vocab) {
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  return 2 * vocab + 2 * blocks;
}

// The forward keeps its exps (RowCapture in `work`); the gradient is then, per block b,
// q = exp_s·exp(m_s(b) − m_s − log Σ_s) and p = exp_z·exp(m_z(b) − m_z − log Σ_z): one
// multiply per entry instead of a second read of s, a, t and two exps. Only where the
// gradient is q and p alone (forward KL; the hard term's softmax(s) is q at τ = 1) and
// the loss is finite; the SPEC §3 rows (NaN, +inf, no distribution) take backward_row.
float forward_backward_row(float upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                           const KernelOptions& o, float* stats, float* work, void* grad, DType grad_dtype) {
  const bool from_exps = (!o.soft || o.divergence == kForwardKL) && (!o.hard || o.tau_one);
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  const RowCapture<float> cap{work, work + vocab, work + 2 * vocab, work + 2 * vocab + blocks};
  const float loss = forward_row_impl<float>(s, a, t, vocab, label, o, stats, from_exps ? &cap : nullptr);
  if (!from_exps || !std::isfinite(loss)) {
    backward_row_impl<float>(upstream, s, a, t, vocab, label, o, stats, grad, grad_dtype);
    return loss;
  }
  const float max_s = stats[kMaxS], log_sum_s = stats[kLogSumS];
  const float max_z = stats[kMaxZ], log_sum_z = stats[kLogSumZ];
  const float c_soft = upstream * static_cast<float>(o.soft_weight * o.inv_tau);
  const float c_hard = upstream * static_cast<float>(o.hard_weight);
  alignas(64) float g[kBlock];
  for (int64_t start = 0, block = 0; start < vocab; start += kBlock, ++block) {
    const int64_t n = std::min(kBlock, vocab - start);
    // min(·, 0): a block seen while the running max was still −inf has m(b) = 0 and only zero exps.
    const float fq = vexp(std::min(cap.max_s[block] - max_s, 0.f) - log_sum_s);
    const float* es = cap.exp_s + start;
    if (o.soft) {
      const float fp = vexp(std::min(cap.max_z[block] - max_z, 0.f) - log_sum_z);
      const float* ez = cap.exp_z + start;
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] = c_soft * (es[i] * fq - ez[i] * fp);
    } else {
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] = 0;
    }
    if (o.hard) {
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] += c_hard * (es[i] * fq);
      if (label >= start && label < start + n) g[label - start] -= c_hard;
    }
    store_block(grad, grad_dtype, start, n, g);
  }
  return loss;
}

double forward_backward_row(double upstream, const Row& s, const Row& a, const Row& t, int64_t vocab,
                            int64_t label, const KernelOptions& o, double* stats, double* /*work*/, void* grad,
                            DType grad_dtype) {
  const double loss = forward_row_impl<double>(s, a, t, vocab, label, o, stats);
  backward_row_impl<double>(upstream, s, a, t, vocab, label, o, stats, grad, grad_dtype);
  return loss;
}

void zero_row(void* grad, DType grad_dtype, int64_t vocab) {
  const size_t bytes = grad_dtype == DType::kFloat64 ? 8 : grad_dtype == DType::kFloat32 ? 4 : 2;
  std::memset(grad, 0, static_cast<size_t>(vocab) * bytes);
}

}  // namespace caad
