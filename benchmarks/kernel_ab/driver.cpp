// A/B timing of the torch-free CPU row kernel (csrc/kernel/) against an older version of it,
// linked into one binary (the old one compiled with -Dcaad=caad_old; see run.sh) and alternated
// on the same rows, one thread, so both see the same machine state round by round.
//
//   driver ROUNDS f|b     64 rows x 32,000 logits (randn*2), alpha = 1, tau = 1, forward KL,
//                         forward_backward_row (grad_in_forward), fp32 (f) or bf16 (b) rows
//
// Prints each version's median ns per entry, the median over rounds of old/new, both losses and
// the largest gradient difference between the two.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define caad caad_old
#include "old/contrastive_kd.h"
#undef caad
#include "kernel/contrastive_kd.h"

namespace {

constexpr int64_t kRows = 64, kVocab = 32000;

uint16_t to_bf16(float f) {  // truncation is enough for test data
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

// One pass over all rows with version NS; returns ns per entry, adds the losses to `total`.
template <typename Row, typename Opts, typename DType, typename Fn>
double run(Fn fn, const std::vector<const void*>& rows_s, const std::vector<const void*>& rows_a,
           const std::vector<const void*>& rows_t, bool bf16, std::vector<float>& work, std::vector<float>& grad,
           double& total) {
  const DType dt = static_cast<DType>(bf16 ? 1 : 0);
  const Opts o;
  float stats[16];
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < kRows; ++r) {
    const Row s{rows_s[r], dt}, a{rows_a[r], dt}, t{rows_t[r], dt};
    total += fn(1.f, s, a, t, kVocab, -1, o, stats, work.data(), grad.data() + r * kVocab, dt);
  }
  const auto end = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(end - start).count() / (kRows * kVocab);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  const bool bf16 = argc > 2 && argv[2][0] == 'b';
  std::mt19937 gen(0);
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<float> s(kRows * kVocab), a(s.size()), t(s.size());
  for (auto* v : {&s, &a, &t}) for (float& x : *v) x = normal(gen);
  std::vector<uint16_t> sb(s.size()), ab(s.size()), tb(s.size());
  for (size_t i = 0; i < s.size(); ++i) sb[i] = to_bf16(s[i]), ab[i] = to_bf16(a[i]), tb[i] = to_bf16(t[i]);
  std::vector<const void*> ps, pa, pt;
  for (int64_t r = 0; r < kRows; ++r) {
    ps.push_back(bf16 ? static_cast<const void*>(&sb[r * kVocab]) : &s[r * kVocab]);
    pa.push_back(bf16 ? static_cast<const void*>(&ab[r * kVocab]) : &a[r * kVocab]);
    pt.push_back(bf16 ? static_cast<const void*>(&tb[r * kVocab]) : &t[r * kVocab]);
  }
  std::vector<float> work(std::max(caad::forward_backward_workspace(kVocab), caad_old::forward_backward_workspace(kVocab)));
  std::vector<float> g_new(s.size()), g_old(s.size());  // bf16 gradients use the first half
  std::vector<double> t_new, t_old, ratio;
  double loss_new = 0, loss_old = 0;
  for (int i = 0; i < rounds; ++i) {
    loss_new = loss_old = 0;
    const double n = run<caad::Row, caad::KernelOptions, caad::DType>(
        static_cast<float (*)(float, const caad::Row&, const caad::Row&, const caad::Row&, int64_t, int64_t,
                              const caad::KernelOptions&, float*, float*, void*, caad::DType)>(
            caad::forward_backward_row),
        ps, pa, pt, bf16, work, g_new, loss_new);
    const double o = run<caad_old::Row, caad_old::KernelOptions, caad_old::DType>(
        static_cast<float (*)(float, const caad_old::Row&, const caad_old::Row&, const caad_old::Row&, int64_t,
                              int64_t, const caad_old::KernelOptions&, float*, float*, void*, caad_old::DType)>(
            caad_old::forward_backward_row),
        ps, pa, pt, bf16, work, g_old, loss_old);
    t_new.push_back(n), t_old.push_back(o), ratio.push_back(o / n);
  }
  double diff = 0;
  for (size_t i = 0; i < (bf16 ? s.size() / 2 : s.size()); ++i) diff = std::max(diff, double(std::fabs(g_new[i] - g_old[i])));
  std::printf("%s: new %.3f ns/entry, old %.3f ns/entry, old/new %.3f (median of %d rounds); loss new %.6f old %.6f; "
              "max |grad new - grad old| %.3g\n", bf16 ? "bf16" : "fp32", median(t_new), median(t_old), median(ratio),
              rounds, loss_new, loss_old, diff);
  return 0;
}
