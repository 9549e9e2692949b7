// CPU row kernels of the contrastive KD loss (see contrastive_kd.h for the passes).
#include "contrastive_kd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "fast_math.h"

namespace caad {
namespace {

constexpr int64_t kBlock = 512;  // fp32 entries per stack buffer: 2 KiB, L1-resident
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

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
void load_block(const Row& row, int64_t offset, int64_t n, float* out) {
  switch (row.dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
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

void store_block(void* dst, DType dtype, int64_t offset, int64_t n, const float* in) {
  switch (dtype) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = in[i];
      break;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(in[i]);
      break;
    }
    case DType::kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_half(in[i]);
      break;
    }
  }
}

// Contrasted, masked, temperature-scaled teacher logits z/tau of one block.
// Also returns the block's contribution to the non-finite check (0 or NaN).
float contrast_block(const float* a, const float* t, int64_t n, const KernelOptions& o, float threshold,
                     float* zt) {
  float chk = 0.f;
  const float one_plus = 1.f + o.alpha;
  for (int64_t i = 0; i < n; ++i) {
    bool impossible = a[i] == kNegInf;
    float z = a[i];
    chk += impossible ? 0.f : a[i] * 0.f;  // NaN or +inf in a
    if (o.use_text) {
      chk += impossible ? 0.f : t[i] * 0.f;  // any non-finite t under a finite a
      z = one_plus * a[i] - o.alpha * t[i];
    }
    z = impossible ? kNegInf : z;
    if (o.plausibility) z = a[i] < threshold ? kNegInf : z;
    zt[i] = z * o.inv_tau;
  }
  return chk;
}

float block_max(const float* x, int64_t n) {
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// One step of an online log-sum-exp: folds a block into (m, sum) and returns
// the factor exp(m_old - m_new) by which other running sums must be rescaled.
struct OnlineLse {
  float m = kNegInf;
  float sum = 0.f;
  float fold(const float* x, int64_t n, float* e) {
    float m_new = std::max(m, block_max(x, n));
    float m_safe = m_new == kNegInf ? 0.f : m_new;
    float corr = fast_exp(m - m_safe);
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      e[i] = fast_exp(x[i] - m_safe);
      s += e[i];
    }
    sum = sum * corr + s;
    m = m_new;
    return corr;
  }
  float log_sum() const { return std::log(sum); }
};

}  // namespace

float forward_row(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& o, float* stats) {
  alignas(64) float sb[kBlock], st[kBlock], ab[kBlock], tb[kBlock], zt[kBlock], e[kBlock];
  float max_a = kNegInf;
  if (o.soft && o.plausibility) {
    for (int64_t start = 0; start < vocab; start += kBlock) {
      int64_t n = std::min(kBlock, vocab - start);
      load_block(a, start, n, ab);
      max_a = std::max(max_a, block_max(ab, n));
    }
  }
  const float threshold = max_a + o.log_beta_p;

  OnlineLse lz, ls, lh;
  float acc_z = 0.f;  // Σ exp(z/τ − m_z)·(z − s)/τ   (forward KL)
  float acc_s = 0.f;  // Σ exp(s/τ − m_s)·(s − z)/τ   (reverse KL)
  float chk = 0.f;    // stays 0 unless a NaN/+inf rule of SPEC §3 fires
  for (int64_t start = 0; start < vocab; start += kBlock) {
    int64_t n = std::min(kBlock, vocab - start);
    load_block(s, start, n, sb);
    for (int64_t i = 0; i < n; ++i) {
      chk += sb[i] == kNegInf ? 0.f : sb[i] * 0.f;
      st[i] = sb[i] * o.inv_tau;
    }
    if (o.soft) {
      load_block(a, start, n, ab);
      if (o.use_text) load_block(t, start, n, tb);
      chk += contrast_block(ab, tb, n, o, threshold, zt);
      float corr = lz.fold(zt, n, e);
      if (o.divergence == kForwardKL) {
        float acc = 0.f;
        for (int64_t i = 0; i < n; ++i) acc += e[i] > 0.f ? e[i] * (zt[i] - st[i]) : 0.f;
        acc_z = acc_z * corr + acc;
      }
    }
    float corr_s = ls.fold(st, n, e);
    if (o.soft && o.divergence == kReverseKL) {
      float acc = 0.f;
      for (int64_t i = 0; i < n; ++i) acc += e[i] > 0.f ? e[i] * (st[i] - zt[i]) : 0.f;
      acc_s = acc_s * corr_s + acc;
    }
    if (o.hard && !o.tau_one) lh.fold(sb, n, e);
  }

  const float lse_z = lz.m + lz.log_sum();
  const float lse_s = ls.m + ls.log_sum();
  float loss = chk;
  float div_aux = 0.f;
  if (o.soft) {
    float div;
    if (o.divergence == kForwardKL) {
      // Σ p(log p − log q) = Σ p (z − s)/τ − (lse_z − lse_s); the lse gap is taken as
      // (max gap) + (log-sum gap) so that large logits do not cancel.
      div = acc_z / lz.sum - (lz.m - ls.m) - (lz.log_sum() - ls.log_sum());
    } else if (o.divergence == kReverseKL) {
      div = acc_s / ls.sum - (ls.m - lz.m) - (ls.log_sum() - lz.log_sum());
      div_aux = div;
    } else {
      const float log_1m_beta = std::log1p(-o.jsd_beta), log_beta = std::log(o.jsd_beta);
      float kl_pm = 0.f, kl_qm = 0.f;
      for (int64_t start = 0; start < vocab; start += kBlock) {
        int64_t n = std::min(kBlock, vocab - start);
        load_block(s, start, n, sb);
        load_block(a, start, n, ab);
        if (o.use_text) load_block(t, start, n, tb);
        contrast_block(ab, tb, n, o, threshold, zt);
        float kp = 0.f, kq = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          float log_p = zt[i] - lse_z;
          float log_q = sb[i] * o.inv_tau - lse_s;
          float log_m = log_add_exp(log_q + log_1m_beta, log_p + log_beta);
          float p = fast_exp(log_p), q = fast_exp(log_q);
          kp += p > 0.f ? p * (log_p - log_m) : 0.f;
          kq += q > 0.f ? q * (log_q - log_m) : 0.f;
        }
        kl_pm += kp;
        kl_qm += kq;
      }
      div = o.jsd_beta * kl_pm + (1.f - o.jsd_beta) * kl_qm;
      div_aux = kl_qm;
    }
    loss += o.soft_weight * div;
  }
  float lse_h = lse_s;
  if (o.hard) {
    if (!o.tau_one) lse_h = lh.m + lh.log_sum();
    float ce = kNaN;
    if (label >= 0 && label < vocab) {
      float s_y;
      load_block(s, label, 1, &s_y);
      ce = lse_h - s_y;
    }
    loss += o.hard_weight * ce;
  }
  stats[0] = lse_z;
  stats[1] = lse_s;
  stats[2] = lse_h;
  stats[3] = max_a;
  stats[4] = div_aux;
  return loss;
}

void backward_row(float upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& o, const float* stats, void* grad, DType grad_dtype) {
  alignas(64) float sb[kBlock], ab[kBlock], tb[kBlock], zt[kBlock], g[kBlock];
  const float lse_z = stats[0], lse_s = stats[1], lse_h = stats[2];
  const float threshold = stats[3] + o.log_beta_p;
  const float div_aux = stats[4];
  const float c_soft = upstream * o.soft_weight * o.inv_tau;
  const float c_hard = upstream * o.hard_weight;
  const float log_1m_beta = std::log1p(-o.jsd_beta), log_beta = std::log(o.jsd_beta);
  for (int64_t start = 0; start < vocab; start += kBlock) {
    int64_t n = std::min(kBlock, vocab - start);
    load_block(s, start, n, sb);
    if (o.soft) {
      load_block(a, start, n, ab);
      if (o.use_text) load_block(t, start, n, tb);
      contrast_block(ab, tb, n, o, threshold, zt);
    }
    for (int64_t i = 0; i < n; ++i) {
      float log_q = sb[i] * o.inv_tau - lse_s;
      float q = fast_exp(log_q);
      float gi = 0.f;
      if (o.soft) {
        float log_p = zt[i] - lse_z;
        float d;
        if (o.divergence == kForwardKL) {
          d = q - fast_exp(log_p);
        } else if (o.divergence == kReverseKL) {
          d = q > 0.f ? q * (log_q - log_p - div_aux) : 0.f;
        } else {
          float log_m = log_add_exp(log_q + log_1m_beta, log_p + log_beta);
          d = (1.f - o.jsd_beta) * (q > 0.f ? q * (log_q - log_m - div_aux) : 0.f);
        }
        gi += c_soft * d;
      }
      if (o.hard) {
        float q_h = o.tau_one ? q : fast_exp(sb[i] - lse_h);
        gi += c_hard * (q_h - (start + i == label ? 1.f : 0.f));
      }
      g[i] = gi;
    }
    store_block(grad, grad_dtype, start, n, g);
  }
}

void zero_row(void* grad, DType grad_dtype, int64_t vocab) {
  const size_t bytes = grad_dtype == DType::kFloat32 ? 4 : 2;
  std::memset(grad, 0, static_cast<size_t>(vocab) * bytes);
}

}  // namespace caad
