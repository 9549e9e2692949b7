// Runs the CUDA kernels' bodies — forward_rows and backward_rows (the two-kernel path) and
// cluster_rows (the sm_90 single-pass kernel), the exact code the GPU kernels call — on the
// CPU: every GPU thread is a std::thread, block and cluster barriers are host barriers, the
// block reductions are the GPU's own (block_merge, block_sum2, block_max_all) with warp
// shuffles emulated through a per-warp exchange buffer, and distributed-shared-memory reads
// go to the other emulated CTAs' memory. Results are compared with the CPU core
// (csrc/kernel/), row by row: loss, statistics and gradient.
//
// What this checks: row addressing and grid-stride loops, the 16-byte chunk phase of each
// row (padded rows, offset starts, mismatched alignments that take the scalar path),
// in-place backward, fp32 inputs with 16-bit gradients; the reduction trees over one to
// three warps (idle lanes, an odd warp count) and their shared-slot protocol; for the
// cluster kernel the slicing of a row over K CTAs (uneven and empty slices), staging,
// slice-relative labels and the rank-ordered merges; the barrier protocol of both (a
// count that differs between threads aborts after a minute instead of hanging); ignored
// rows, the special values of SPEC §3, every divergence and option, fp32/bf16/fp16.
// Built with -DCAAD_SANITIZE=thread, a shared-memory access that a missing barrier leaves
// unordered is a reported race. What it cannot check: the hardware's shuffle, cp.async
// and DSMEM implementations, launch limits, and the GPU's ex2.approx (the host path of
// fast_exp is used). Built by CMake when a CUDA compiler exists (host code only: it runs
// without a GPU); `ctest` runs it.
#include <cmath>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cuda/contrastive_kd_kernels.cu"
#include "kernel/contrastive_kd.h"
#include "kernel/options.h"

namespace {

using caad::cuda::detail::ClusterCtaShared;
using caad::cuda::detail::FwdState;
using caad::cuda::detail::Params;

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    if (g_failed <= 40) std::printf("FAILED: %s\n", what.c_str());
  }
}

// A barrier for n threads: arrivals are an atomic count, the last one bumps the generation
// (acquire/release, so the barrier orders memory like __syncthreads and ThreadSanitizer sees
// it); waiters yield the core, which with hundreds of emulated threads on a few cores costs
// far less than a condition variable's wake-ups. One that is not reached by all n threads
// within a minute means they disagree on the barrier count (a hang on the GPU): abort.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const long gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (unsigned spins = 1; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      std::this_thread::yield();
      if (spins % 4096 == 0 && std::chrono::steady_clock::now() > deadline) {
        std::fprintf(stderr, "FATAL: a barrier of %d threads timed out: divergent barriers\n", n_);
        std::abort();
      }
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<long> gen_{0};
};

// One emulated warp: 32 lanes, a barrier, and the exchange buffer of its shuffles.
struct EmuWarp {
  Barrier bar{32};
  alignas(16) unsigned char lanes[32][sizeof(FwdState)];
};

// One emulated block: its barrier, its dynamic shared memory, the shared slots of the block
// reductions (the same trees as the GPU's: csrc/cuda's block_merge/block_sum2/block_max_all run
// here with shuffles through EmuWarp) and the scratch of __syncthreads_or.
struct EmuBlock {
  ClusterCtaShared sh;
  caad::cuda::detail::Norms norms;
  std::vector<uint4> stage;  // 16-byte aligned
  Barrier bar;
  int threads;
  std::vector<EmuWarp> warps;
  FwdState state_slots[caad::cuda::detail::kMaxWarps];
  float2 sum_slots[caad::cuda::detail::kMaxWarps];
  float max_slots[caad::cuda::detail::kMaxWarps];
  std::vector<int> flags;
  EmuBlock(int n, size_t stage_bytes)
      : stage(stage_bytes / 16 + 1), bar(n), threads(n), warps(n / 32), flags(n) {
    if (n % 32 != 0 || n / 32 > caad::cuda::detail::kMaxWarps) {
      std::fprintf(stderr, "FATAL: an emulated block has a whole number of warps (<= %d), not %d threads\n",
                   caad::cuda::detail::kMaxWarps, n);
      std::abort();
    }
  }
};

// One emulated thread's warp context (the contract of block_merge / block_sum2 / block_max_all):
// a shuffle publishes the lane's value, waits for the warp, reads the source lane, and waits
// again so the buffer can be reused. Out-of-range shfl_down sources return the lane's own value.
struct HostWarp {
  EmuBlock* blk;
  int64_t tid;
  int lane() const { return static_cast<int>(tid & 31); }
  int warp() const { return static_cast<int>(tid >> 5); }
  int warps() const { return blk->threads / 32; }
  void sync() const { blk->bar.wait(); }
  template <class X>
  X exchange(const X& v, int src) const {
    static_assert(sizeof(X) <= sizeof(FwdState), "shuffle payload");
    EmuWarp& w = blk->warps[warp()];
    std::memcpy(w.lanes[lane()], &v, sizeof(X));
    w.bar.wait();
    X r;
    std::memcpy(&r, w.lanes[src], sizeof(X));
    w.bar.wait();
    return r;
  }
  template <class X>
  X shfl_down(const X& v, int off) const {
    return exchange(v, lane() + off < 32 ? lane() + off : lane());
  }
  float shfl_xor(float v, int off) const { return exchange(v, lane() ^ off); }
};

struct EmuCluster {
  std::vector<EmuBlock*> ctas;
  Barrier bar;
  explicit EmuCluster(int threads) : bar(threads) {}
};

// One emulated thread's view of its block (the contract of forward_rows / backward_rows).
struct HostBlockCtx {
  EmuBlock* blk;
  int64_t block_, blocks_, tid_, threads_;

  int64_t block() const { return block_; }
  int64_t blocks() const { return blocks_; }
  int64_t tid() const { return tid_; }
  int64_t threads() const { return threads_; }
  void sync_block() const { blk->bar.wait(); }
  bool any(bool v) const {
    blk->flags[tid_] = v ? 1 : 0;
    blk->bar.wait();
    bool r = false;
    for (int f : blk->flags) r = r || f != 0;
    blk->bar.wait();
    return r;
  }
  // The GPU's reductions themselves, over emulated shuffles and the block's shared slots.
  float block_max(float v) const {
    return caad::cuda::detail::block_max_all(HostWarp{blk, tid_}, v, blk->max_slots);
  }
  template <int DIV>
  FwdState merge(FwdState v, bool soft, bool hard_sep) const {
    return caad::cuda::detail::block_merge<DIV>(HostWarp{blk, tid_}, v, blk->state_slots, soft, hard_sep);
  }
  float2 sum2(float2 v) const { return caad::cuda::detail::block_sum2(HostWarp{blk, tid_}, v, blk->sum_slots); }
};

// ... plus the cluster (the contract of cluster_rows).
struct HostClusterCtx : HostBlockCtx {
  EmuCluster* cl;
  unsigned rank_, size_;

  unsigned rank() const { return rank_; }
  unsigned size() const { return size_; }
  int64_t cluster_id() const { return block_; }
  int64_t clusters() const { return blocks_; }
  void sync_cluster() const { cl->bar.wait(); }
  template <class X>
  X* remote(X* local, unsigned r) const {
    const auto offset = reinterpret_cast<char*>(local) - reinterpret_cast<char*>(&blk->sh);
    return reinterpret_cast<X*>(reinterpret_cast<char*>(&cl->ctas[r]->sh) + offset);
  }
  void copy16(void* dst, const void* src) const { std::memcpy(dst, src, 16); }
  void copy_wait() const {}
};

// The grid, one block (or cluster) at a time; the threads of a block (cluster) run concurrently.
template <typename T, int DIV>
void run_cluster_kernel(const Params& p, int K, int64_t slice, int threads, int clusters) {
  const size_t staged = sizeof(T) * static_cast<size_t>(1 + (p.soft ? 1 : 0) + (p.text ? 1 : 0));
  for (int cid = 0; cid < clusters; ++cid) {
    EmuCluster cl(K * threads);
    std::vector<std::unique_ptr<EmuBlock>> ctas;
    for (int r = 0; r < K; ++r) {
      ctas.push_back(std::make_unique<EmuBlock>(threads, static_cast<size_t>(slice) * staged));
      cl.ctas.push_back(ctas.back().get());
    }
    std::vector<std::thread> pool;
    for (int r = 0; r < K; ++r) {
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, r, t] {
          HostClusterCtx cx{{cl.ctas[r], cid, clusters, t, threads}, &cl, static_cast<unsigned>(r),
                            static_cast<unsigned>(K)};
          caad::cuda::detail::cluster_rows<T, DIV>(p, slice, cx, cl.ctas[r]->sh,
                                                   reinterpret_cast<unsigned char*>(cl.ctas[r]->stage.data()));
        });
      }
    }
    for (auto& th : pool) th.join();
  }
}

template <class Body>
void run_blocks(int blocks, int threads, const Body& body) {
  for (int b = 0; b < blocks; ++b) {
    EmuBlock blk(threads, 0);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        HostBlockCtx cx{&blk, b, blocks, t, threads};
        body(cx, blk);
      });
    }
    for (auto& th : pool) th.join();
  }
}

// Element types: storage bits and the conversions of the CPU core's DType.
template <typename T>
struct Host;
template <>
struct Host<float> {
  static constexpr caad::DType kType = caad::DType::kFloat32;
  static float value(float x) { return x; }
  static float make(float x) { return x; }
  static constexpr double kTol = 2e-5;
};
template <>
struct Host<__nv_bfloat16> {
  static constexpr caad::DType kType = caad::DType::kBFloat16;
  static __nv_bfloat16 make(float x) { return __float2bfloat16_rn(x); }
  static float value(__nv_bfloat16 x) { return __bfloat162float(x); }
  static constexpr double kTol = 8e-3;  // two bf16 ulps: both sides round their fp32 gradient once
};
template <>
struct Host<__half> {
  static constexpr caad::DType kType = caad::DType::kFloat16;
  static __half make(float x) { return __float2half_rn(x); }
  static float value(__half x) { return __half2float(x); }
  static constexpr double kTol = 1e-3;
};

std::string hexf(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%a", x);
  return buf;
}

bool close(double got, double want, double rtol, double atol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}


// The kernel's gradient of one row against the CPU core's float64 path, with SPEC §4's
// budget: the dtype's rounding, plus 4× the largest error of the CPU core's own fp32 path on
// this row (the error budget the Python tests use), plus `allowance[j]`, the rounding model of
// the CUDA kernels' direct form q·(r − D) (see direct_form_allowance).
template <typename G>
void check_grad_row(const std::string& where, const G* got, int64_t V, const std::vector<G>& core32,
                    const std::vector<double>& core64, const std::vector<double>& allowance) {
  using HG = Host<G>;
  double slack = 0, scale = 0;
  for (int64_t j = 0; j < V; ++j) {
    slack = std::fmax(slack, std::fabs(HG::value(core32[j]) - core64[j]));
    scale = std::fmax(scale, std::fabs(core64[j]));
  }
  bool ok = true;
  double worst = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double g = HG::value(got[j]), w = core64[j];
    const double err = std::fabs(g - w);
    worst = std::fmax(worst, err);
    const bool fine = err <= HG::kTol * std::fabs(w) + 1e-6 * scale + 4 * slack + allowance[j] + 1e-7;
    if (!fine && std::getenv("EMU_VERBOSE") != nullptr) {
      std::printf("  j=%lld got %g want %g (fp32 core %g)\n", static_cast<long long>(j), g, w,
                  static_cast<double>(HG::value(core32[j])));
    }
    ok = ok && fine;
  }
  check(ok, where + " grad, worst abs error " + std::to_string(worst) + ", fp32 core's " + std::to_string(slack));
}

// Random logits in `size` entries of each buffer; labels, upstream weights and the special rows
// every case checks (at least 7 rows; `at(n)` is the element offset of row n):
// row 2 ignored, row 3 labelled with the last entry, row 4 an impossible token (a = -inf, t = NaN),
// row 5 s = -inf where p > 0 (infinite forward KL), row 6 NaN in a (a NaN row).
template <typename T, class At>
void fill_case(std::mt19937& gen, size_t size, T* s, T* a, T* t, T* s0, T* a0, T* t0, const At& at, int64_t rows,
               int64_t V, std::vector<int64_t>& labels, std::vector<float>& grad_rows) {
  using H = Host<T>;
  std::normal_distribution<float> normal(0.f, 3.f);
  for (size_t i = 0; i < size; ++i) {
    s[i] = H::make(normal(gen));
    a[i] = H::make(normal(gen));
    t[i] = H::make(normal(gen));
  }
  const float inf = std::numeric_limits<float>::infinity();
  labels.resize(rows);
  grad_rows.resize(rows);
  for (int64_t n = 0; n < rows; ++n) {
    labels[n] = static_cast<int64_t>(gen() % V);
    grad_rows[n] = 0.25f + 0.5f * static_cast<float>(n);
  }
  labels[2] = -100;
  if (V > 1) labels[3] = V - 1;
  a0[at(4) + V / 2] = H::make(-inf);
  t0[at(4) + V / 2] = H::make(std::nanf(""));
  if (V > 3) s0[at(5) + 1] = H::make(-inf);
  if (V > 5) a0[at(6) + V - 2] = H::make(std::nanf(""));
}

struct Opts {
  const char* name;
  double alpha, beta_p, tau, jsd_beta, w_soft, w_hard;
  bool text;
};

// The CUDA kernels evaluate the reverse-KL / JSD gradient in its direct form q·(r − D), r = log q − log p
// (or log q − log m), each term in fp32; the CPU core instead writes the entry at the student's argmax as
// minus the sum of the others (exact where q saturates and r ≈ D ≈ |x|). The direct form's first-order
// rounding error per entry is |c|·q·ε·(|x/τ| + |z/τ| + |log q| + |log p| + |D| + Σ q|log q| + Σ q|log p|),
// given 4 ulps here. The budget borrowed the core's fp32 error alone before: that error depends on the
// core's summation order, i.e. the build machine's vector width, and an AVX-512 host's core was accurate
// enough to fail the direct form (block default div=1 V=203 row=7: 8e-6 against 4 × 1e-6), as was
// the compensated core everywhere.
template <typename T, int DIV>
std::vector<double> direct_form_allowance(const Opts& o, const T* s, const T* a, const T* t, int64_t V,
                                          const double* st, double upstream) {
  using H = Host<T>;
  std::vector<double> out(V, 0.0);
  if (DIV == caad::kForwardKL || o.w_soft == 0) return out;
  const double ninf = -std::numeric_limits<double>::infinity();
  const double threshold = o.beta_p > 0 ? st[caad::kMaxA] + std::log(o.beta_p) : ninf;
  std::vector<double> lq(V), lp(V), zt(V);
  double spread = 0;  // Σ q (|log q| + |log p|): the scale of D's own rounding
  for (int64_t j = 0; j < V; ++j) {
    const double x = H::value(s[j]), av = H::value(a[j]), tv = o.text ? H::value(t[j]) : 0.0;
    double z = o.text && o.alpha != 0 ? (1 + o.alpha) * av - o.alpha * tv : av;
    if (av == ninf || av < threshold) z = ninf;
    zt[j] = (std::fabs((1 + o.alpha) * av) + std::fabs(o.alpha * tv)) / o.tau;
    lq[j] = x / o.tau - st[caad::kMaxS] - st[caad::kLogSumS];
    lp[j] = z / o.tau - st[caad::kMaxZ] - st[caad::kLogSumZ];
    const double q = std::exp(lq[j]);
    if (q > 0 && std::isfinite(lp[j])) spread += q * (std::fabs(lq[j]) + std::fabs(lp[j]));
  }
  const double c = std::fabs(upstream * o.w_soft / o.tau * (DIV == caad::kJSD ? 1 - o.jsd_beta : 1));
  const double eps = std::numeric_limits<float>::epsilon();
  for (int64_t j = 0; j < V; ++j) {
    const double q = std::exp(lq[j]);
    if (!(q > 0) || !std::isfinite(lq[j]) || !std::isfinite(zt[j])) continue;
    const double lp_j = std::isfinite(lp[j]) ? std::fabs(lp[j]) : 0.0;
    const double mag = std::fabs(lq[j]) + lp_j + zt[j] + std::fabs(lq[j] + st[caad::kMaxS] + st[caad::kLogSumS]) +
                       std::fabs(st[caad::kDivAux]) + spread;
    out[j] = 4 * eps * c * q * mag;
  }
  return out;
}

template <typename T, int DIV>
void run_case(const Opts& o, int64_t V, int K, int threads, uint32_t seed) {
  using H = Host<T>;
  constexpr int N = caad::cuda::detail::Elem<T>::kVec;
  const int64_t rows = 7, stride = V + 2 * N;  // padded rows: the row stride is not V
  std::mt19937 gen(seed);
  std::vector<T> s(rows * stride), a(rows * stride), t(rows * stride);
  std::vector<int64_t> labels;
  std::vector<float> grad_rows;
  fill_case(gen, s.size(), s.data(), a.data(), t.data(), s.data(), a.data(), t.data(),
            [&](int64_t n) { return n * stride; }, rows, V, labels, grad_rows);

  const caad::KernelOptions ko = caad::make_options(o.alpha, o.beta_p, o.tau, DIV, o.jsd_beta, o.w_soft, o.w_hard,
                                                    o.text);
  caad::cuda::RowTensor rs{s.data(), 0, stride, H::kType}, ra{a.data(), 0, stride, H::kType},
      rt{t.data(), 0, stride, H::kType};
  caad::cuda::LabelView lv{labels.data(), 0, 1};
  Params p = caad::cuda::detail::make_params(rs, ra, rt, lv, rows, rows, V, ko, -100);
  std::vector<float> loss(rows, -1.f), stats(rows * caad::kNumStats, -1.f);
  std::vector<T> grad(rows * stride, H::make(12345.f));
  p.loss = loss.data();
  p.stats_out = stats.data();
  p.grad = grad.data();
  p.g_sb = 0;
  p.g_st = stride;
  p.grad_rows = grad_rows.data();
  p.grad_rows_stride = 1;
  const int64_t per_cta = (V + K - 1) / K;
  const int64_t slice = (per_cta + N - 1) / N * N;
  run_cluster_kernel<T, DIV>(p, K, slice, threads, /*clusters=*/2);

  const std::string tag = std::string(o.name) + " div=" + std::to_string(DIV) + " V=" + std::to_string(V) +
                          " K=" + std::to_string(K) + " dtype=" + std::to_string(static_cast<int>(H::kType));
  for (int64_t n = 0; n < rows; ++n) {
    const std::string where = tag + " row=" + std::to_string(n);
    std::vector<T> want_grad(V);
    std::vector<double> want64(V, 0.0);
    float want_stats[caad::kNumStats] = {};
    double stats64[caad::kNumStats] = {};
    float want_loss = 0.f;
    if (labels[n] == -100) {
      caad::zero_row(want_grad.data(), H::kType, V);
    } else {
      const caad::Row row_s{&s[n * stride], H::kType}, row_a{&a[n * stride], H::kType},
          row_t{&t[n * stride], H::kType};
      want_loss = caad::forward_row(row_s, row_a, row_t, V, labels[n], ko, want_stats);
      caad::backward_row(grad_rows[n], row_s, row_a, row_t, V, labels[n], ko, want_stats, want_grad.data(),
                         H::kType);
      caad::forward_row(row_s, row_a, row_t, V, labels[n], ko, stats64);
      caad::backward_row(static_cast<double>(grad_rows[n]), row_s, row_a, row_t, V, labels[n], ko, stats64,
                         want64.data(), caad::DType::kFloat64);
    }
    check(close(loss[n], want_loss, 2e-5, 2e-6), where + " loss " + std::to_string(loss[n]) + " vs " +
                                                     std::to_string(want_loss));
    if (labels[n] != -100 && std::isfinite(want_loss)) {
      // The statistics the gradient reads under these options (the others are don't-cares).
      std::vector<int> exact = {caad::kMaxS}, logs = {caad::kLogSumS};
      if (ko.soft) {
        // max z/τ is exact given z, but z = (1+α)a − αt is one FMA on the GPU and two roundings
        // in the core: a few ulps of the terms apart, which cancellation makes large next to z.
        double terms = 0;
        for (int64_t j = 0; j < V; ++j) {
          const double a_j = H::value(a[n * stride + j]), t_j = ko.use_text ? H::value(t[n * stride + j]) : 0.0;
          if (std::isfinite(a_j) && std::isfinite(t_j)) {
            terms = std::fmax(terms, (std::fabs((1 + o.alpha) * a_j) + std::fabs(o.alpha * t_j)) / o.tau);
          }
        }
        const double budget = 4 * std::numeric_limits<float>::epsilon() * terms;
        check(close(stats[n * caad::kNumStats + caad::kMaxZ], want_stats[caad::kMaxZ], 1e-6, budget),
              where + " stat max_z " + hexf(stats[n * caad::kNumStats + caad::kMaxZ]) + " vs " +
                  hexf(want_stats[caad::kMaxZ]));
        logs.push_back(caad::kLogSumZ);
      }
      if (ko.hard) exact.push_back(caad::kMaxH), logs.push_back(caad::kLogSumH);
      if (ko.plausibility) exact.push_back(caad::kMaxA);
      if (ko.soft && DIV != caad::kForwardKL) logs.push_back(caad::kDivAux);
      for (int k : exact) {
        check(close(stats[n * caad::kNumStats + k], want_stats[k], 1e-6, 0),
              where + " stat " + std::to_string(k) + " " + hexf(stats[n * caad::kNumStats + k]) + " vs " +
                  hexf(want_stats[k]));
      }
      for (int k : logs) {
        check(close(stats[n * caad::kNumStats + k], want_stats[k], 1e-5, 1e-6),
              where + " stat " + std::to_string(k) + " " + hexf(stats[n * caad::kNumStats + k]) + " vs " +
                  hexf(want_stats[k]));
      }
    }
    if (!std::isfinite(want_loss)) continue;  // a NaN/inf row's gradient is unspecified beyond "not silent"
    check_grad_row<T>(where, &grad[n * stride], V, want_grad, want64,
                      labels[n] == -100 ? std::vector<double>(V, 0.0)  // an ignored row: exactly 0
                                        : direct_form_allowance<T, DIV>(o, &s[n * stride], &a[n * stride],
                                                                        &t[n * stride], V, stats64, grad_rows[n]));
    // The padding after the row is never written.
    bool untouched = true;
    for (int64_t j = V; j < stride && n * stride + j < static_cast<int64_t>(grad.size()); ++j) {
      untouched = untouched && H::value(grad[n * stride + j]) == H::value(H::make(12345.f));
    }
    check(untouched, where + " padding untouched");
  }
}

const Opts kOpts[] = {
    {"default", 1.0, 0.0, 1.0, 0.5, 1.0, 0.0, true},
    {"plaus_tau2_hard", 0.5, 0.1, 2.0, 0.3, 0.8, 0.3, true},
    {"alpha0", 0.0, 0.0, 1.0, 0.5, 1.0, 0.0, false},
    {"hard_only", 1.0, 0.0, 1.0, 0.5, 0.0, 1.0, true},
    {"hard_tau1", 2.0, 0.05, 1.0, 0.7, 1.0, 0.5, true},
};

template <typename T>
void run_type(uint32_t seed) {
  constexpr int N = caad::cuda::detail::Elem<T>::kVec;
  struct Shape {
    int64_t V;
    int K, threads;
  };
  // Blocks are whole warps, as on the GPU (the shuffles need all 32 lanes). V = N: one chunk;
  // 25·N over 4 CTAs: uneven slices; 2·N over 4: two empty slices; 300·N over 3 with one warp
  // and 520·N over 2 with two: several chunks per thread; 40·N over 2 with three warps: idle
  // threads and a second-level tree over an odd number of warps.
  const Shape shapes[] = {{N, 1, 32},        {25 * N, 4, 32},  {2 * N, 4, 32},
                          {300 * N, 3, 32},  {520 * N, 2, 64}, {40 * N, 2, 96}};
  for (const Opts& o : kOpts) {
    for (const Shape& sh : shapes) {
      run_case<T, caad::kForwardKL>(o, sh.V, sh.K, sh.threads, seed++);
      run_case<T, caad::kReverseKL>(o, sh.V, sh.K, sh.threads, seed++);
      run_case<T, caad::kJSD>(o, sh.V, sh.K, sh.threads, seed++);
    }
  }
}


// The two-kernel path: forward_rows then backward_rows over a [B, T, V] view whose rows
// start at `offset` elements past a 16-byte boundary and are `pad` elements apart beyond V,
// so the rows' chunk phases differ; `a_offset` != `offset` makes the tensors disagree in
// alignment (the scalar path). `inplace`: the gradient overwrites a copy of s.
template <typename T, typename G, int DIV>
void run_block_case(const Opts& o, int64_t V, int64_t offset, int64_t a_offset, int64_t pad, bool inplace, int threads,
                    int blocks, uint32_t seed) {
  using H = Host<T>;
  using HG = Host<G>;
  const int64_t B = 2, T_ = 4, rows = B * T_, st = V + pad, sb = T_ * st + 5;
  const size_t size = static_cast<size_t>(B * sb + 16);
  std::mt19937 gen(seed);
  std::vector<T> sbuf(size), abuf(size), tbuf(size);
  T* s0 = sbuf.data() + offset;
  T* a0 = abuf.data() + a_offset;
  T* t0 = tbuf.data() + offset;
  auto at = [&](int64_t n) { return (n / T_) * sb + (n % T_) * st; };
  std::vector<int64_t> labels;
  std::vector<float> grad_rows;
  fill_case(gen, size, sbuf.data(), abuf.data(), tbuf.data(), s0, a0, t0, at, rows, V, labels, grad_rows);

  const caad::KernelOptions ko = caad::make_options(o.alpha, o.beta_p, o.tau, DIV, o.jsd_beta, o.w_soft, o.w_hard,
                                                    o.text);
  caad::cuda::RowTensor rs{s0, sb, st, H::kType}, ra{a0, sb, st, H::kType}, rt{t0, sb, st, H::kType};
  caad::cuda::LabelView lv{labels.data(), T_, 1};
  Params p = caad::cuda::detail::make_params(rs, ra, rt, lv, rows, T_, V, ko, -100);
  std::vector<float> loss(rows, -1.f), stats(rows * caad::kNumStats, -1.f);
  p.loss = loss.data();
  p.stats_out = stats.data();
  run_blocks(blocks, threads, [&](HostBlockCtx& cx, EmuBlock& blk) {
    caad::cuda::detail::forward_rows<T, DIV>(p, cx, blk.norms);
  });

  // Backward: into a separate buffer laid out like s, or over a copy of s (in place).
  std::vector<G> gbuf(size, HG::make(12345.f));
  std::vector<T> s_copy(sbuf);
  G* g0 = reinterpret_cast<G*>(inplace ? static_cast<void*>(s_copy.data() + offset)
                                       : static_cast<void*>(gbuf.data() + offset));
  if (inplace) p.s = s_copy.data() + offset;
  p.grad = g0;
  p.g_sb = sb;
  p.g_st = st;
  p.stats_in = stats.data();
  p.grad_rows = grad_rows.data();
  p.grad_rows_stride = 1;
  run_blocks(blocks, threads, [&](HostBlockCtx& cx, EmuBlock&) {
    caad::cuda::detail::backward_rows<T, G, DIV>(p, cx);
  });

  const std::string tag = std::string("block ") + o.name + " div=" + std::to_string(DIV) + " V=" +
                          std::to_string(V) + " offset=" + std::to_string(offset) + "/" + std::to_string(a_offset) +
                          " pad=" + std::to_string(pad) + (inplace ? " inplace" : "") +
                          " dtype=" + std::to_string(static_cast<int>(H::kType)) + "/" +
                          std::to_string(static_cast<int>(HG::kType));
  for (int64_t n = 0; n < rows; ++n) {
    const std::string where = tag + " row=" + std::to_string(n);
    std::vector<G> want_grad(V);
    std::vector<double> want64(V, 0.0);
    float want_stats[caad::kNumStats] = {};
    double stats64[caad::kNumStats] = {};
    float want_loss = 0.f;
    if (labels[n] == -100) {
      caad::zero_row(want_grad.data(), HG::kType, V);
    } else {
      const caad::Row row_s{s0 + at(n), H::kType}, row_a{a0 + at(n), H::kType}, row_t{t0 + at(n), H::kType};
      want_loss = caad::forward_row(row_s, row_a, row_t, V, labels[n], ko, want_stats);
      caad::backward_row(grad_rows[n], row_s, row_a, row_t, V, labels[n], ko, want_stats, want_grad.data(),
                         HG::kType);
      caad::forward_row(row_s, row_a, row_t, V, labels[n], ko, stats64);
      caad::backward_row(static_cast<double>(grad_rows[n]), row_s, row_a, row_t, V, labels[n], ko, stats64,
                         want64.data(), caad::DType::kFloat64);
    }
    check(close(loss[n], want_loss, 2e-5, 2e-6), where + " loss " + std::to_string(loss[n]) + " vs " +
                                                     std::to_string(want_loss));
    if (!std::isfinite(want_loss)) continue;
    check_grad_row<G>(where, g0 + at(n), V, want_grad, want64,
                      labels[n] == -100 ? std::vector<double>(V, 0.0)  // an ignored row: exactly 0
                                        : direct_form_allowance<T, DIV>(o, s0 + at(n), a0 + at(n), t0 + at(n), V,
                                                                        stats64, grad_rows[n]));
  }
  if (!inplace) {  // nothing outside the rows was written
    bool untouched = true;
    std::vector<bool> in_row(size, false);
    for (int64_t n = 0; n < rows; ++n) {
      for (int64_t j = 0; j < V; ++j) in_row[offset + at(n) + j] = true;
    }
    for (size_t i = 0; i < size; ++i) {
      if (!in_row[i]) untouched = untouched && HG::value(gbuf[i]) == HG::value(HG::make(12345.f));
    }
    check(untouched, tag + " gradient written only inside the rows");
  }
}

template <typename T, typename G>
void run_block_type(uint32_t seed) {
  struct Layout {
    int64_t V, offset, a_offset, pad;
    bool inplace;
    int threads, blocks;
  };
  // Whole warps per block; 3001 entries over two warps: several chunks per thread.
  const Layout layouts[] = {
      {1, 0, 0, 0, false, 32, 3},    {7, 1, 1, 3, false, 32, 8},     {203, 0, 0, 0, false, 32, 3},
      {203, 3, 3, 5, true, 32, 8},   {203, 1, 2, 1, false, 64, 5},   {640, 2, 2, 3, false, 32, 2},
      {640, 0, 0, 0, true, 96, 8},   {3001, 1, 1, 2, false, 64, 3},
  };
  for (const Opts& o : kOpts) {
    for (const Layout& l : layouts) {
      if (l.inplace && !std::is_same<T, G>::value) continue;
      run_block_case<T, G, caad::kForwardKL>(o, l.V, l.offset, l.a_offset, l.pad, l.inplace, l.threads, l.blocks,
                                             seed++);
      run_block_case<T, G, caad::kReverseKL>(o, l.V, l.offset, l.a_offset, l.pad, l.inplace, l.threads, l.blocks,
                                             seed++);
      run_block_case<T, G, caad::kJSD>(o, l.V, l.offset, l.a_offset, l.pad, l.inplace, l.threads, l.blocks, seed++);
    }
  }
}

}  // namespace

int main() {
  run_block_type<float, float>(100);
  run_block_type<__nv_bfloat16, __nv_bfloat16>(200);
  run_block_type<__half, __half>(300);
  run_block_type<float, __nv_bfloat16>(400);
  run_type<float>(1);
  run_type<__nv_bfloat16>(1000);
  run_type<__half>(2000);
  std::printf("kernel emulation: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
