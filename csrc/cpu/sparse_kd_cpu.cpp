// Sparse-target KD loss (SPEC §9) on the CPU: rows in parallel (at::parallel_for), one row per call.
//
// Passes over the vocabulary of a row:
//   * forward: one read of s — an online log-sum-exp of s/τ (and of s at τ = 1 for a hard term
//     with τ ≠ 1) — then a gather of the K cached ids; the K-sums are taken in fp64;
//   * backward: the K ids (and the label) are gathered first, so that grad_s may alias s; then
//     one pass writes (c − r)·q (+ the hard term) everywhere, and the K (+1) entries are
//     overwritten with their exact values c·q − p (see caad_kernels/sparse_reference.py:
//     c = P_S + P_T, r = P_T/Q_T, the tail spread in proportion to q).
// The row is read into small fp32 stack buffers so the inner loops are float loops that the
// compiler vectorises (fast_exp/fast_log of fast_math.h); float64 rows use libm (gradcheck).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../kernel/fast_math.h"

namespace caad {
namespace {

constexpr int64_t kBlock = 512;  // entries per stack buffer: 2 KiB in fp32, L1-resident

// Per-row statistics of the forward, read by the backward.
enum SparseStat : int { kMaxU = 0, kLogSumU, kMaxH, kLogSumH, kMass, kTailRatio, kNumSparseStats };

template <typename Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

inline float vexp(float x) { return fast_exp(x); }
inline double vexp(double x) { return std::exp(x); }

// An online log-sum-exp: the sum is relative to `safe` (0 while the running max is still −inf).
template <typename Acc>
struct OnlineLse {
  Acc raw = kNegInf<Acc>, safe = 0, sum = 0;
  void add(const Acc* x, int64_t n, Acc* scratch) {
    Acc bm = kNegInf<Acc>;
#pragma omp simd reduction(max : bm)
    for (int64_t i = 0; i < n; ++i) bm = x[i] > bm ? x[i] : bm;
    const Acc raw2 = bm > raw ? bm : raw;
    const Acc safe2 = raw2 == kNegInf<Acc> ? Acc(0) : raw2;
    Acc block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t i = 0; i < n; ++i) {
      scratch[i] = vexp(x[i] - safe2);
      block += scratch[i];
    }
    sum = sum * vexp(raw - safe2) + block;
    raw = raw2;
    safe = safe2;
  }
};

template <typename T, typename Acc>
inline void load(const T* p, int64_t n, Acc* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Acc>(p[i]);
}

// Stores n accumulated values in T. bf16 goes through fast_math.h's branch-free round-to-nearest-even
// (c10::BFloat16's constructor branches on NaN, which keeps the loop scalar).
template <typename T, typename Acc>
inline void store(T* out, int64_t n, const Acc* g) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) bits[i] = float_to_bf16(static_cast<float>(g[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(g[i]);
  }
}

// Addresses row n of a [B, T, V] view (rows need not be uniformly strided).
template <typename T>
struct Rows {
  T* base;
  int64_t stride_b, stride_t, per_batch;
  explicit Rows(const at::Tensor& x)
      : base(static_cast<T*>(x.data_ptr())), stride_b(x.stride(0)), stride_t(x.stride(1)), per_batch(x.size(1)) {}
  T* at(int64_t n) const {
    const int64_t b = n / per_batch, t = n - b * per_batch;
    return base + b * stride_b + t * stride_t;
  }
};

struct Options {
  double inv_tau, soft_weight, hard_weight;
  int64_t ignore_index;
  bool soft, hard, tau_one;
};

// Loss of one valid row; writes its statistics.
template <typename T, typename Acc>
Acc forward_row(const T* s, int64_t vocab, const int64_t* ids, const Acc* lp, int64_t k, const Acc* tail,
                int64_t label, const Options& o, Acc* stats) {
  alignas(64) Acc xb[kBlock], ub[kBlock], eb[kBlock];
  const Acc inv_tau = static_cast<Acc>(o.inv_tau);
  OnlineLse<Acc> lu, lh;
  Acc chk = 0;  // stays 0 unless s holds NaN or +inf (x·0 is NaN exactly for those)
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    load(s + start, n, xb);
    Acc c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t i = 0; i < n; ++i) {
      c += xb[i] == kNegInf<Acc> ? Acc(0) : xb[i] * Acc(0);
      ub[i] = xb[i] * inv_tau;
    }
    chk += c;
    lu.add(ub, n, eb);
    if (o.hard && !o.tau_one) lh.add(xb, n, eb);
  }
  const Acc max_u = lu.safe, log_sum_u = std::log(lu.sum);
  const Acc max_h = o.tau_one ? max_u : lh.safe;
  const Acc log_sum_h = o.tau_one ? log_sum_u : std::log(lh.sum);
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  double loss = chk;
  if (lu.sum == 0) loss = nan;  // every student logit −inf: no distribution
  double mass = 0, ratio = 0;
  if (o.soft) {
    double d = 0, p_s = 0, q_s = 0;
    bool infinite = false, has_target = false;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t v = ids[j];
      if (v < 0) continue;
      const double l = lp[j];
      if (std::isnan(l) || l == inf) {
        d = nan;
        continue;
      }
      const Acc log_q = (static_cast<Acc>(s[v]) * inv_tau - max_u) - log_sum_u;
      q_s += std::exp(static_cast<double>(log_q));  // every listed id is outside the tail's tokens
      if (l == -inf) continue;                       // listed with p = 0
      has_target = true;
      const double p = std::exp(l);
      p_s += p;
      if (log_q == kNegInf<Acc>) {
        infinite = true;
      } else {
        d += p * (l - static_cast<double>(log_q));
      }
    }
    if (tail != nullptr) {
      const double lt = *tail;
      if (std::isnan(lt) || lt == inf) {
        d = nan;
      } else if (lt > -inf) {
        has_target = true;
        const double p_t = std::exp(lt), q_t = 1.0 - q_s;  // Q_T from the one pass (absolute error ~1e-7)
        mass += p_t;
        if (q_t <= 0) {
          infinite = true;
        } else {
          d += p_t * (lt - std::log(q_t));
          ratio = p_t / q_t;
        }
      }
    }
    mass += p_s;
    if (!has_target) d = nan;  // no target distribution in this row
    if (infinite && !std::isnan(d)) d = inf;
    loss += o.soft_weight * d;
  }
  if (o.hard) {
    double ce = nan;
    if (label >= 0 && label < vocab) ce = (static_cast<double>(max_h) - static_cast<Acc>(s[label])) + log_sum_h;
    loss += o.hard_weight * ce;
  }
  stats[kMaxU] = max_u;
  stats[kLogSumU] = log_sum_u;
  stats[kMaxH] = max_h;
  stats[kLogSumH] = log_sum_h;
  stats[kMass] = static_cast<Acc>(mass);
  stats[kTailRatio] = static_cast<Acc>(ratio);
  return static_cast<Acc>(loss);
}

// grad = upstream · ∂ℓ/∂s for one valid row; `grad` may alias `s`. `fix` holds K + 1 scratch values.
template <typename T, typename Acc>
void backward_row(Acc upstream, const T* s, int64_t vocab, const int64_t* ids, const Acc* lp, int64_t k,
                  int64_t label, const Options& o, const Acc* stats, T* grad, Acc* fix) {
  alignas(64) Acc xb[kBlock], gb[kBlock];
  const Acc inv_tau = static_cast<Acc>(o.inv_tau);
  const Acc max_u = stats[kMaxU], log_sum_u = stats[kLogSumU], max_h = stats[kMaxH], log_sum_h = stats[kLogSumH];
  const Acc c_soft = o.soft ? upstream * static_cast<Acc>(o.soft_weight) * inv_tau : Acc(0);
  const Acc c_hard = o.hard ? upstream * static_cast<Acc>(o.hard_weight) : Acc(0);
  const double mass = stats[kMass], ratio = stats[kTailRatio];
  const bool label_ok = o.hard && label >= 0 && label < vocab;
  // Exact values of the support entries (and the label), gathered before any write.
  auto entry = [&](int64_t v, double p, bool in_support) {
    const double x = static_cast<double>(static_cast<Acc>(s[v]));
    const double q = std::exp((static_cast<Acc>(x) * inv_tau - max_u) - log_sum_u);
    double g = c_soft * (in_support ? mass * q - p : (mass - ratio) * q);
    if (o.hard) g += c_hard * (std::exp((static_cast<Acc>(x) - max_h) - log_sum_h) - (v == label ? 1.0 : 0.0));
    return static_cast<Acc>(g);
  };
  bool label_in_support = false;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t v = ids[j];
    if (v < 0) continue;
    label_in_support |= v == label;
    if (o.soft || v == label) fix[j] = entry(v, lp[j] > kNegInf<Acc> ? std::exp(static_cast<double>(lp[j])) : 0.0,
                                             true);
  }
  if (label_ok && !label_in_support) fix[k] = entry(label, 0.0, false);
  const Acc a_soft = static_cast<Acc>(c_soft * (mass - ratio));
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    load(s + start, n, xb);
    if (o.hard) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        gb[i] = a_soft * vexp((xb[i] * inv_tau - max_u) - log_sum_u) + c_hard * vexp((xb[i] - max_h) - log_sum_h);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gb[i] = a_soft * vexp((xb[i] * inv_tau - max_u) - log_sum_u);
    }
    store(grad + start, n, gb);
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t v = ids[j];
    if (v >= 0 && (o.soft || v == label)) grad[v] = static_cast<T>(fix[j]);
  }
  if (label_ok && !label_in_support) grad[label] = static_cast<T>(fix[k]);
}

int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

Options make_options(double temperature, double soft_weight, double hard_weight, int64_t ignore_index) {
  return Options{1.0 / temperature, soft_weight, hard_weight, ignore_index, soft_weight != 0.0, hard_weight != 0.0,
                 temperature == 1.0};
}

void check_inputs(const at::Tensor& s, const at::Tensor& ids, const at::Tensor& lp,
                  const std::optional<at::Tensor>& tail, const std::optional<at::Tensor>& labels) {
  TORCH_CHECK(s.dim() == 3 && (s.size(2) <= 1 || s.stride(2) == 1), "s must be [B, T, V] with unit stride over V");
  const int64_t rows = s.size(0) * s.size(1);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == rows && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "ids must be a contiguous int64 [N, K]");
  TORCH_CHECK(lp.sizes() == ids.sizes() && lp.is_contiguous() &&
                  (lp.scalar_type() == at::kFloat || lp.scalar_type() == at::kDouble),
              "logprobs must be a contiguous float32/float64 [N, K]");
  if (tail.has_value()) {
    TORCH_CHECK(tail->dim() == 1 && tail->size(0) == rows && tail->scalar_type() == lp.scalar_type() &&
                    tail->is_contiguous(), "tail must be a contiguous [N] of logprobs' dtype");
  }
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == rows && labels->scalar_type() == at::kLong &&
                    labels->is_contiguous(), "labels must be a contiguous int64 [N]");
  }
}

template <typename T, typename Acc>
void forward_all(const at::Tensor& s, const at::Tensor& ids, const at::Tensor& lp,
                 const std::optional<at::Tensor>& tail, const std::optional<at::Tensor>& labels, const Options& o,
                 at::Tensor& loss, at::Tensor& stats) {
  const Rows<const T> sv(s);
  const int64_t rows = s.size(0) * s.size(1), vocab = s.size(2), k = ids.size(1);
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const Acc* lp_p = lp.data_ptr<Acc>();
  const Acc* tail_p = tail.has_value() ? tail->data_ptr<Acc>() : nullptr;
  const int64_t* y_p = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  Acc* loss_p = loss.data_ptr<Acc>();
  Acc* stats_p = stats.data_ptr<Acc>();
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      Acc* st = stats_p + n * kNumSparseStats;
      const int64_t y = y_p ? y_p[n] : 0;
      if (y_p && y == o.ignore_index) {
        loss_p[n] = 0;
        std::fill(st, st + kNumSparseStats, Acc(0));
        continue;
      }
      loss_p[n] = forward_row<T, Acc>(sv.at(n), vocab, ids_p + n * k, lp_p + n * k, k,
                                      tail_p ? tail_p + n : nullptr, y, o, st);
    }
  });
}

template <typename T, typename Acc>
void backward_all(const at::Tensor& up, const at::Tensor& s, const at::Tensor& ids, const at::Tensor& lp,
                  const std::optional<at::Tensor>& labels, const at::Tensor& stats, const Options& o,
                  const at::Tensor& grad_s) {
  const Rows<const T> sv(s);
  const Rows<T> gv(grad_s);
  const int64_t rows = s.size(0) * s.size(1), vocab = s.size(2), k = ids.size(1);
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const Acc* lp_p = lp.data_ptr<Acc>();
  const int64_t* y_p = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const Acc* up_p = up.data_ptr<Acc>();
  const Acc* stats_p = stats.data_ptr<Acc>();
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    std::vector<Acc> fix(static_cast<size_t>(k) + 1);
    for (int64_t n = begin; n < end; ++n) {
      T* g = gv.at(n);
      const int64_t y = y_p ? y_p[n] : 0;
      if (y_p && y == o.ignore_index) {
        std::fill(g, g + vocab, T(0));
        continue;
      }
      backward_row<T, Acc>(up_p[n], sv.at(n), vocab, ids_p + n * k, lp_p + n * k, k, y_p ? y : -1, o,
                           stats_p + n * kNumSparseStats, g, fix.data());
    }
  });
}

// Calls F<T, Acc> for s's dtype and the accumulation dtype (logprobs' dtype: float32 or float64).
template <template <typename, typename> class F, typename... Args>
void dispatch(const at::Tensor& s, bool dbl, Args&&... args) {
  switch (s.scalar_type()) {
    case at::kFloat:
      return dbl ? F<float, double>::run(args...) : F<float, float>::run(args...);
    case at::kDouble:
      TORCH_CHECK(dbl, "float64 student logits need float64 logprobs");
      return F<double, double>::run(args...);
    case at::kBFloat16:
      return dbl ? F<c10::BFloat16, double>::run(args...) : F<c10::BFloat16, float>::run(args...);
    case at::kHalf:
      return dbl ? F<c10::Half, double>::run(args...) : F<c10::Half, float>::run(args...);
    default:
      TORCH_CHECK(false, "s must be float32, bfloat16, float16 or float64, got ", s.scalar_type());
  }
}

template <typename T, typename Acc>
struct Forward {
  template <typename... Args>
  static void run(Args&&... args) { forward_all<T, Acc>(args...); }
};

template <typename T, typename Acc>
struct Backward {
  template <typename... Args>
  static void run(Args&&... args) { backward_all<T, Acc>(args...); }
};

std::tuple<at::Tensor, at::Tensor> native_sparse_kd_forward_cpu(
    const at::Tensor& s, const at::Tensor& ids, const at::Tensor& logprobs, const std::optional<at::Tensor>& tail,
    const std::optional<at::Tensor>& labels, double temperature, double soft_weight, double hard_weight,
    int64_t ignore_index) {
  check_inputs(s, ids, logprobs, tail, labels);
  const int64_t rows = s.size(0) * s.size(1);
  const bool dbl = logprobs.scalar_type() == at::kDouble;
  auto loss = at::empty({rows}, logprobs.options());
  auto stats = at::empty({rows, kNumSparseStats}, logprobs.options());
  const Options o = make_options(temperature, soft_weight, hard_weight, ignore_index);
  dispatch<Forward>(s, dbl, s, ids, logprobs, tail, labels, o, loss, stats);
  return {loss, stats};
}

void native_sparse_kd_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& s, const at::Tensor& ids,
                                   const at::Tensor& logprobs, const std::optional<at::Tensor>& tail,
                                   const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                                   double temperature, double soft_weight, double hard_weight, int64_t ignore_index,
                                   const at::Tensor& grad_s) {
  check_inputs(s, ids, logprobs, tail, labels);
  const int64_t rows = s.size(0) * s.size(1);
  TORCH_CHECK(grad_s.sizes() == s.sizes() && grad_s.scalar_type() == s.scalar_type() &&
                  (grad_s.size(2) <= 1 || grad_s.stride(2) == 1), "grad_s must be like s");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == kNumSparseStats &&
                  stats.scalar_type() == logprobs.scalar_type() && stats.is_contiguous(),
              "stats must be a contiguous [N, ", static_cast<int>(kNumSparseStats),
              "] tensor from native_sparse_kd_forward");
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == rows, "grad_rows must be [N]");
  const bool dbl = logprobs.scalar_type() == at::kDouble;
  const at::Tensor up = grad_rows.to(logprobs.scalar_type()).contiguous();
  const Options o = make_options(temperature, soft_weight, hard_weight, ignore_index);
  dispatch<Backward>(s, dbl, up, s, ids, logprobs, labels, stats, o, grad_s);
}

}  // namespace
}  // namespace caad

TORCH_LIBRARY_IMPL(caad, CPU, m) {
  m.impl("native_sparse_kd_forward", &caad::native_sparse_kd_forward_cpu);
  m.impl("native_sparse_kd_backward", &caad::native_sparse_kd_backward_cpu);
}
