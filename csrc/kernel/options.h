// Building KernelOptions from the op's scalar arguments (shared by CPU and CUDA bindings).
#pragma once

#include <cmath>

#include "contrastive_kd.h"

namespace caad {

inline KernelOptions make_options(double alpha, double plausibility_beta, double temperature, int64_t divergence,
                                  double jsd_beta, double soft_weight, double hard_weight, bool has_text) {
  KernelOptions o;
  o.alpha = alpha;
  o.log_beta_p = plausibility_beta > 0.0 ? std::log(plausibility_beta) : 0.0;
  o.inv_tau = 1.0 / temperature;
  o.jsd_beta = jsd_beta;
  o.soft_weight = soft_weight;
  o.hard_weight = hard_weight;
  o.divergence = static_cast<int32_t>(divergence);
  o.soft = soft_weight != 0.0;
  o.use_text = o.soft && alpha != 0.0 && has_text;
  o.plausibility = o.soft && plausibility_beta > 0.0;
  o.hard = hard_weight != 0.0;
  o.tau_one = temperature == 1.0;
  return o;
}

}  // namespace caad
