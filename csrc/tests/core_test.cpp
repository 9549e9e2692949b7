// Tests of the torch-free CPU core (csrc/kernel/) without Python: every divergence and
// option against an independent long-double formula written here, the float and double
// paths, the special-value rules of SPEC §3, and the vectorisable exp/log/bf16 helpers.
// Built and run by CMake: `ctest --test-dir build`.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernel/contrastive_kd.h"
#include "kernel/fast_math.h"
#include "kernel/options.h"

namespace {

int g_passed = 0, g_failed = 0;
using LD = long double;
constexpr double kInf = std::numeric_limits<double>::infinity();

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

bool close(double got, double want, double rtol, double atol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

struct Case {
  double alpha, beta_p, tau, jsd_beta, w_soft, w_hard;
  int div;  // 0 forward KL, 1 reverse KL, 2 JSD
  bool text;
};

// The loss of one row and its gradient, straight from SPEC §2 in long double.
LD reference(const std::vector<double>& s, const std::vector<double>& a, const std::vector<double>& t, int64_t y,
             const Case& c, std::vector<LD>& grad) {
  const size_t v = s.size();
  std::vector<LD> z(v), lp(v), lq(v);
  LD amax = -kInf;
  for (size_t i = 0; i < v; ++i) amax = std::max<LD>(amax, a[i]);
  for (size_t i = 0; i < v; ++i) {
    z[i] = c.text ? (1 + c.alpha) * (LD)a[i] - c.alpha * (LD)t[i] : (LD)a[i];
    if (c.beta_p > 0 && a[i] < amax + std::log((LD)c.beta_p)) z[i] = -kInf;
  }
  auto log_softmax = [&](const std::vector<LD>& x, LD scale, std::vector<LD>& out) {
    LD m = -kInf, sum = 0;
    for (LD xi : x) m = std::max(m, xi * scale);
    for (LD xi : x) sum += std::exp(xi * scale - m);
    for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * scale - m - std::log(sum);
  };
  std::vector<LD> sl(s.begin(), s.end());
  log_softmax(z, 1 / (LD)c.tau, lp);
  log_softmax(sl, 1 / (LD)c.tau, lq);
  LD d = 0, kl_qm = 0;
  std::vector<LD> lm(v);
  for (size_t i = 0; i < v; ++i) {
    LD p = std::exp(lp[i]), q = std::exp(lq[i]);
    if (c.div == 0) {
      if (p > 0) d += p * (lp[i] - lq[i]);
    } else if (c.div == 1) {
      if (q > 0) d += q * (lq[i] - lp[i]);
    } else {
      LD m = (1 - c.jsd_beta) * q + c.jsd_beta * p;
      lm[i] = std::log(m);
      if (p > 0) d += c.jsd_beta * p * (lp[i] - lm[i]);
      if (q > 0) kl_qm += q * (lq[i] - lm[i]);
    }
  }
  if (c.div == 2) d += (1 - c.jsd_beta) * kl_qm;
  std::vector<LD> l1(v);
  log_softmax(sl, 1, l1);
  const LD loss = c.w_soft * d + c.w_hard * (-l1[y]);
  grad.assign(v, 0);
  for (size_t i = 0; i < v; ++i) {
    LD p = std::exp(lp[i]), q = std::exp(lq[i]), du;
    if (c.div == 0) du = q - p;
    else if (c.div == 1) du = q > 0 ? q * (lq[i] - lp[i] - d) : 0;
    else du = (1 - c.jsd_beta) * (q > 0 ? q * (lq[i] - lm[i] - kl_qm) : 0);
    grad[i] = c.w_soft * du / c.tau + c.w_hard * (std::exp(l1[i]) - (i == (size_t)y ? 1 : 0));
  }
  return loss;
}

template <typename Acc>
void run_case(const Case& c, int64_t v, uint32_t seed, double rtol, double atol, const char* tag) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 3.0);
  std::vector<double> s(v), a(v), t(v);
  for (int64_t i = 0; i < v; ++i) s[i] = normal(gen), a[i] = normal(gen), t[i] = normal(gen);
  const int64_t y = static_cast<int64_t>(gen() % v);
  std::vector<Acc> sx(s.begin(), s.end()), ax(a.begin(), a.end()), tx(t.begin(), t.end());
  // Round the inputs to Acc first so the reference sees exactly what the kernel sees.
  for (int64_t i = 0; i < v; ++i) s[i] = sx[i], a[i] = ax[i], t[i] = tx[i];
  const caad::DType dt = sizeof(Acc) == 8 ? caad::DType::kFloat64 : caad::DType::kFloat32;
  const caad::Row rs{sx.data(), dt}, ra{ax.data(), dt}, rt{tx.data(), dt};
  const caad::KernelOptions o =
      caad::make_options(c.alpha, c.beta_p, c.tau, c.div, c.jsd_beta, c.w_soft, c.w_hard, c.text);
  Acc stats[caad::kNumStats];
  const Acc loss = caad::forward_row(rs, ra, rt, v, y, o, stats);
  std::vector<LD> want_grad;
  const LD want = reference(s, a, t, y, c, want_grad);
  char name[160];
  std::snprintf(name, sizeof name, "%s V=%lld div=%d alpha=%g beta_p=%g tau=%g jsd=%g hard=%g", tag,
                static_cast<long long>(v), c.div, c.alpha, c.beta_p, c.tau, c.jsd_beta, c.w_hard);
  check(close(loss, (double)want, rtol, atol), std::string(name) + " loss " + std::to_string((double)loss) +
                                                   " vs " + std::to_string((double)want));
  std::vector<Acc> grad(v);
  caad::backward_row(Acc(0.7), rs, ra, rt, v, y, o, stats, grad.data(), dt);
  bool ok = true;
  for (int64_t i = 0; i < v; ++i) ok = ok && close(grad[i], 0.7 * (double)want_grad[i], rtol, atol);
  check(ok, std::string(name) + " grad");
  // The one-pass row (grad_in_forward): same loss and gradient from the forward's kept exponentials.
  std::vector<Acc> work(caad::forward_backward_workspace(v)), grad1(v);
  Acc stats1[caad::kNumStats];
  const Acc loss1 = caad::forward_backward_row(Acc(0.7), rs, ra, rt, v, y, o, stats1, work.data(), grad1.data(), dt);
  check(close(loss1, (double)want, rtol, atol), std::string(name) + " one-pass loss");
  ok = true;
  for (int64_t i = 0; i < v; ++i) ok = ok && close(grad1[i], 0.7 * (double)want_grad[i], rtol, atol);
  check(ok, std::string(name) + " one-pass grad");
}

void test_parity() {
  const Case cases[] = {
      {1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0, true},  {0.0, 0.0, 2.0, 0.5, 1.0, 0.3, 0, false},
      {0.5, 0.1, 0.7, 0.5, 1.0, 0.0, 0, true},  {1.0, 0.0, 1.5, 0.5, 1.0, 0.0, 1, true},
      {1.0, 0.0, 1.0, 0.3, 1.0, 0.0, 2, true},  {2.0, 0.2, 2.0, 0.7, 0.5, 0.5, 2, true},
      {1.0, 0.0, 3.0, 0.5, 0.0, 1.0, 0, true},
  };
  uint32_t seed = 1;
  for (const Case& c : cases) {
    for (int64_t v : {1, 7, 2049, 4099}) {  // one, two and three 2048-entry blocks
      run_case<float>(c, v, seed, 2e-5, 2e-6, "fp32");
      run_case<double>(c, v, seed, 1e-11, 1e-13, "fp64");
      ++seed;
    }
  }
}

void test_special_values() {
  const caad::KernelOptions o = caad::make_options(1.0, 0.0, 1.0, 0, 0.5, 1.0, 0.0, true);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  float stats[caad::kNumStats];
  auto loss_of = [&](std::vector<float> s, std::vector<float> a, std::vector<float> t) {
    const caad::Row rs{s.data(), caad::DType::kFloat32}, ra{a.data(), caad::DType::kFloat32},
        rt{t.data(), caad::DType::kFloat32};
    return caad::forward_row(rs, ra, rt, static_cast<int64_t>(s.size()), 0, o, stats);
  };
  const std::vector<float> ok{0.5f, -1.f, 2.f};
  check(std::isnan(loss_of({0.5f, nan, 2.f}, ok, ok)), "NaN in s gives NaN");
  check(std::isnan(loss_of(ok, {0.5f, inf, 2.f}, ok)), "+inf in a gives NaN");
  check(std::isnan(loss_of(ok, ok, {0.5f, -inf, 2.f})), "-inf in t under finite a gives NaN");
  const float masked = loss_of(ok, {0.5f, -inf, 2.f}, {0.5f, -inf, 2.f});
  check(std::isfinite(masked), "-inf in a and t masks the token (no -inf + inf)");
  check(std::isinf(loss_of({-inf, -1.f, 2.f}, ok, ok)), "-inf in s where p > 0 gives +inf");
  check(std::isnan(loss_of(ok, {-inf, -inf, -inf}, ok)), "no possible teacher token gives NaN");
}

void test_fast_math() {
  double worst_exp = 0, worst_log = 0;
  for (float x = -87.f; x <= 0.f; x += 0.001377f) {
    worst_exp = std::max(worst_exp, std::fabs(caad::fast_exp(x) / std::exp((double)x) - 1));
  }
  for (float x = 1e-30f; x < 1e30f; x *= 1.0137f) {
    worst_log = std::max(worst_log, std::fabs(caad::fast_log(x) - std::log((double)x)) /
                                        std::max(1.0, std::fabs(std::log((double)x))));
  }
  check(worst_exp < 4e-7, "fast_exp relative error " + std::to_string(worst_exp));
  check(worst_log < 4e-7, "fast_log error " + std::to_string(worst_log));
  const float inf = std::numeric_limits<float>::infinity();
  check(caad::fast_exp(-inf) == 0.f && std::isnan(caad::fast_exp(std::nanf(""))), "fast_exp specials");
  check(caad::fast_log(0.f) == -inf && caad::fast_log(inf) == inf && std::isnan(caad::fast_log(-1.f)),
        "fast_log specials");
  // bf16 round-to-nearest-even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 -> 1 (even).
  check(caad::float_to_bf16(1.00390625f) == 0x3f80, "bf16 tie rounds to even");
  check(caad::float_to_bf16(1.0078125f + 1e-6f) == 0x3f81, "bf16 rounds up past the tie");
  check(std::isnan(caad::bf16_to_float(caad::float_to_bf16(std::nanf("")))), "bf16 keeps NaN");
}

}  // namespace

int main() {
  test_parity();
  test_special_values();
  test_fast_math();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
