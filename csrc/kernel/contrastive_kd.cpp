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

// Contrasted, masked, temperature-scaled teacher logits z/tau of one block.
// Also returns the block's contribution to the non-finite check (0 or NaN).
template <typename Acc>
Acc contrast_block(const Acc* a, const Acc* t, int64_t n, const KernelOptions& o, Acc threshold, Acc* zt) {
  Acc chk = 0;
  const Acc alpha = static_cast<Acc>(o.alpha), one_plus = 1 + alpha, inv_tau = static_cast<Acc>(o.inv_tau);
  for (int64_t i = 0; i < n; ++i) {
    bool impossible = a[i] == kNegInf<Acc>;
    Acc z = a[i];
    chk += impossible ? Acc(0) : a[i] * Acc(0);  // NaN or +inf in a
    if (o.use_text) {
      chk += impossible ? Acc(0) : t[i] * Acc(0);  // any non-finite t under a finite a
      z = one_plus * a[i] - alpha * t[i];
    }
    z = impossible ? kNegInf<Acc> : z;
    if (o.plausibility) z = a[i] < threshold ? kNegInf<Acc> : z;
    zt[i] = z * inv_tau;
  }
  return chk;
}

template <typename Acc>
Acc block_max(const Acc* x, int64_t n) {
  Acc m = kNegInf<Acc>;
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

template <typename Acc>
Acc forward_row_impl(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                      const KernelOptions& o, Acc* stats) {
  using std::log;
  const Acc inv_tau = static_cast<Acc>(o.inv_tau);
  alignas(64) Acc sb[kBlock], st[kBlock], ab[kBlock], tb[kBlock], zt[kBlock], es[kBlock], ez[kBlock];
  Acc max_a = kNegInf<Acc>;
  if (o.soft && o.plausibility) {
    for (int64_t start = 0; start < vocab; start += kBlock) {
      int64_t n = std::min(kBlock, vocab - start);
      load_block(a, start, n, ab);
      max_a = std::max(max_a, block_max(ab, n));
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
  Acc chk = 0;                       // stays 0 unless a NaN/+inf rule of SPEC §3 fires
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    load_block(s, start, n, sb);
    Acc smax = kNegInf<Acc>;
    for (int64_t i = 0; i < n; ++i) {
      chk += sb[i] == kNegInf<Acc> ? Acc(0) : sb[i] * Acc(0);
      st[i] = sb[i] * inv_tau;
      smax = st[i] > smax ? st[i] : smax;
    }
    Acc c_s, shift_s;
    advance(ms, smax, c_s, shift_s);
    Acc block_sum_s = 0;
    for (int64_t i = 0; i < n; ++i) {
      es[i] = vexp(st[i] - ms.safe);
      block_sum_s += es[i];
    }
    if (o.soft) {
      load_block(a, start, n, ab);
      if (o.use_text) load_block(t, start, n, tb);
      chk += contrast_block(ab, tb, n, o, threshold, zt);
      Acc c_z, shift_z;
      advance(mz, block_max(zt, n), c_z, shift_z);
      Acc block_sum_z = 0, bzz = 0, bzs = 0;
      for (int64_t i = 0; i < n; ++i) {
        ez[i] = vexp(zt[i] - mz.safe);
        block_sum_z += ez[i];
      }
      if (o.divergence == kForwardKL) {
        for (int64_t i = 0; i < n; ++i) {
          bool live = ez[i] > 0;
          bzz += live ? ez[i] * (zt[i] - mz.safe) : Acc(0);
          bzs += live ? ez[i] * (st[i] - ms.safe) : Acc(0);
        }
        acc_zz = c_z * (acc_zz - shift_z * sum_z) + bzz;
        acc_zs = c_z * (acc_zs - shift_s * sum_z) + bzs;
      } else if (o.divergence == kReverseKL) {
        Acc bss = 0, bsz = 0;
        for (int64_t i = 0; i < n; ++i) {
          bool live = es[i] > 0;
          bss += live ? es[i] * (st[i] - ms.safe) : Acc(0);
          bsz += live ? es[i] * (zt[i] - mz.safe) : Acc(0);
        }
        acc_ss = c_s * (acc_ss - shift_s * sum_s) + bss;
        acc_sz = c_s * (acc_sz - shift_z * sum_s) + bsz;
      }
      sum_z = sum_z * c_z + block_sum_z;
    }
    sum_s = sum_s * c_s + block_sum_s;
    if (o.hard && !o.tau_one) {
      Acc c_h, shift_h;
      advance(mh, block_max(sb, n), c_h, shift_h);
      Acc bh = 0;
      for (int64_t i = 0; i < n; ++i) bh += vexp(sb[i] - mh.safe);
      sum_h = sum_h * c_h + bh;
    }
  }

  const Acc log_sum_z = log(sum_z), log_sum_s = log(sum_s);
  Acc loss = chk;
  Acc div_aux = 0;
  if (o.soft) {
    Acc div;
    if (o.divergence == kForwardKL) {
      div = (acc_zz - acc_zs) / sum_z - (log_sum_z - log_sum_s);
    } else if (o.divergence == kReverseKL) {
      div = (acc_ss - acc_sz) / sum_s - (log_sum_s - log_sum_z);
      div_aux = div;
    } else {
      const Acc log_1m_beta = static_cast<Acc>(std::log1p(-o.jsd_beta));
      const Acc log_beta = static_cast<Acc>(std::log(o.jsd_beta));
      Acc kl_pm = 0, kl_qm = 0;
      for (int64_t start = 0; start < vocab; start += kBlock) {
        int64_t n = std::min(kBlock, vocab - start);
        load_block(s, start, n, sb);
        load_block(a, start, n, ab);
        if (o.use_text) load_block(t, start, n, tb);
        contrast_block(ab, tb, n, o, threshold, zt);
        Acc kp = 0, kq = 0;
        for (int64_t i = 0; i < n; ++i) {
          Acc log_p = (zt[i] - mz.safe) - log_sum_z;
          Acc log_q = (sb[i] * inv_tau - ms.safe) - log_sum_s;
          Acc log_m = log_add_exp_t(log_q + log_1m_beta, log_p + log_beta);
          Acc p = vexp(log_p), q = vexp(log_q);
          kp += p > 0 ? p * (log_p - log_m) : Acc(0);
          kq += q > 0 ? q * (log_q - log_m) : Acc(0);
        }
        kl_pm += kp;
        kl_qm += kq;
      }
      const Acc beta = static_cast<Acc>(o.jsd_beta);
      div = beta * kl_pm + (1 - beta) * kl_qm;
      div_aux = kl_qm;
    }
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
  const Acc log_1m_beta = static_cast<Acc>(std::log1p(-o.jsd_beta)), log_beta = static_cast<Acc>(std::log(o.jsd_beta));
  for (int64_t start = 0; start < vocab; start += kBlock) {
    int64_t n = std::min(kBlock, vocab - start);
    load_block(s, start, n, sb);
    if (o.soft) {
      load_block(a, start, n, ab);
      if (o.use_text) load_block(t, start, n, tb);
      contrast_block(ab, tb, n, o, threshold, zt);
    }
    for (int64_t i = 0; i < n; ++i) {
      Acc log_q = (sb[i] * inv_tau - max_s) - log_sum_s;
      Acc q = vexp(log_q);
      Acc gi = 0;
      if (o.soft) {
        Acc log_p = (zt[i] - max_z) - log_sum_z;
        Acc d;
        if (o.divergence == kForwardKL) {
          d = q - vexp(log_p);
        } else if (o.divergence == kReverseKL) {
          d = q > 0 ? q * (log_q - log_p - div_aux) : Acc(0);
        } else {
          Acc log_m = log_add_exp_t(log_q + log_1m_beta, log_p + log_beta);
          d = (1 - beta) * (q > 0 ? q * (log_q - log_m - div_aux) : Acc(0));
        }
        gi += c_soft * d;
      }
      if (o.hard) {
        Acc q_h = o.tau_one ? q : vexp((sb[i] - max_h) - log_sum_h);
        gi += c_hard * (q_h - (start + i == label ? Acc(1) : Acc(0)));
      }
      g[i] = gi;
    }
    store_block(grad, grad_dtype, start, n, g);
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

void zero_row(void* grad, DType grad_dtype, int64_t vocab) {
  const size_t bytes = grad_dtype == DType::kFloat64 ? 8 : grad_dtype == DType::kFloat32 ? 4 : 2;
  std::memset(grad, 0, static_cast<size_t>(vocab) * bytes);
}

}  // namespace caad
