// Contrastive KD loss, CPU row kernels: the torch-free core (SPEC §2–§5).
//
// One call handles one row of V logits. Passes over the vocabulary:
//   * plausibility (beta_p > 0): one read of `a` alone for max(a);
//   * always: one streaming pass over a, t, s with online log-sum-exp of z/tau
//     and s/tau (and of s at tau = 1 for the hard term) plus the running
//     weighted sum that gives forward or reverse KL in the same pass;
//   * generalized JSD (0 < beta_j < 1) only: a second pass, since log m needs
//     both normalisers first.
// The backward is one pass that rebuilds p and q from 5 per-row statistics.
// forward_backward_row (grad_in_forward) instead keeps the forward's exps of s/τ
// and z/τ in a per-thread scratch of ~2·V floats (L2-resident at V = 32,000) and
// writes the gradient from it: s, a, t are read once for both (forward KL).
// Inputs are read block by block into small fp32 stack buffers so the inner
// loops are plain float loops the compiler vectorises (exp and log are
// branch-free polynomials, see fast_math.h); all sums are fp32.
#pragma once

#include <cstdint>

namespace caad {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// A read-only row of V logits in one of the supported dtypes.
struct Row {
  const void* ptr = nullptr;
  DType dtype = DType::kFloat32;
};

enum Divergence : int32_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// Options after validation, in the form the kernels use (double so that the
// float64 path is exact; the fp32 path rounds them once).
struct KernelOptions {
  double alpha = 1.0;
  double log_beta_p = 0.0;  // log(plausibility_beta); only read when plausibility is on
  double inv_tau = 1.0;
  double jsd_beta = 0.5;
  double soft_weight = 1.0;
  double hard_weight = 0.0;
  int32_t divergence = kForwardKL;  // JSD endpoints already resolved to KL
  bool soft = true;                 // soft_weight != 0: teacher tensors are read
  bool use_text = true;             // alpha != 0 (and soft): t is read
  bool plausibility = false;        // beta_p > 0 (and soft)
  bool hard = false;                // hard_weight != 0
  bool tau_one = true;              // temperature == 1: the hard term reuses lse(s/tau)
};

// Per-row statistics; each log-sum-exp is kept as (max, log Σ exp(x − max)) so the
// backward's log-probabilities (x − max) − log Σ are exact near the max at any scale.
enum Stat : int { kMaxZ = 0, kLogSumZ, kMaxS, kLogSumS, kMaxH, kLogSumH, kMaxA, kDivAux, kNumStats };

// Loss of one valid row; writes its kNumStats statistics. `label` is the hard-term
// target (ignored unless opts.hard); an out-of-range label gives NaN. The float
// overload accumulates in fp32 (the fast path), the double one in fp64.
float forward_row(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, float* stats);
double forward_row(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                   const KernelOptions& opts, double* stats);

// grad = upstream * d(loss)/d(s) for one valid row, stored in `grad_dtype`.
// `grad` may alias `s` (in-place backward): each block is read before it is written.
void backward_row(float upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, const float* stats, void* grad, DType grad_dtype);
void backward_row(double upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, const double* stats, void* grad, DType grad_dtype);

// Loss and grad of one valid row in one call, as forward_row then backward_row give them, with
// `work` a scratch of forward_backward_workspace(vocab) accumulator values: the forward keeps
// its exponentials there, so the gradient (forward KL) reads s, a and t no second time.
// `grad` must not alias the inputs.
float forward_backward_row(float upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                           const KernelOptions& opts, float* stats, float* work, void* grad, DType grad_dtype);
double forward_backward_row(double upstream, const Row& s, const Row& a, const Row& t, int64_t vocab,
                            int64_t label, const KernelOptions& opts, double* stats, double* work, void* grad,
                            DType grad_dtype);
int64_t forward_backward_workspace(int64_t vocab);

// Writes `vocab` zeros (the gradient of an ignored row).
void zero_row(void* grad, DType grad_dtype, int64_t vocab);

}  // namespace caad
