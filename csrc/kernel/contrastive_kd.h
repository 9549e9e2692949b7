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
// Inputs are read block by block into small fp32 stack buffers so the inner
// loops are plain float loops the compiler vectorises (exp and log are
// branch-free polynomials, see fast_math.h); all sums are fp32.
#pragma once

#include <cstdint>

namespace caad {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// A read-only row of V logits in one of the supported dtypes.
struct Row {
  const void* ptr = nullptr;
  DType dtype = DType::kFloat32;
};

enum Divergence : int32_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// Options after validation, in the form the kernels use.
struct KernelOptions {
  float alpha = 1.f;
  float log_beta_p = 0.f;  // log(plausibility_beta); only read when plausibility is on
  float inv_tau = 1.f;
  float jsd_beta = 0.5f;
  float soft_weight = 1.f;
  float hard_weight = 0.f;
  int32_t divergence = kForwardKL;  // JSD endpoints already resolved to KL
  bool soft = true;                 // soft_weight != 0: teacher tensors are read
  bool use_text = true;             // alpha != 0 (and soft): t is read
  bool plausibility = false;        // beta_p > 0 (and soft)
  bool hard = false;                // hard_weight != 0
  bool tau_one = true;              // temperature == 1: the hard term reuses lse(s/tau)
};

constexpr int kNumStats = 5;  // lse_z, lse_s, lse_s_hard, max_a, div_aux

// Loss of one valid row; writes its statistics. `label` is the hard-term target
// (ignored unless opts.hard); an out-of-range label gives NaN.
float forward_row(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, float* stats);

// grad = upstream * d(loss)/d(s) for one valid row, stored in `grad_dtype`.
// `grad` may alias `s` (in-place backward): each block is read before it is written.
void backward_row(float upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, const float* stats, void* grad, DType grad_dtype);

// Writes `vocab` zeros (the gradient of an ignored row).
void zero_row(void* grad, DType grad_dtype, int64_t vocab);

}  // namespace caad
