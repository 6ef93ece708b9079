#pragma once
// Helpers of the concrete methods that tests check directly. The methods themselves register with
// CreateMethod from their own files (MethodRegistrar, method.h).

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "core/adapt/method.h"

namespace strata {

// methods_osft.cc
// osft: full fine-tuning of the target weights constrained to the complement of the top-k_l
// singular directions of each weight at task start (docs ALGORITHMS.md section 4).
// P(G) = (I − U Uᵀ) G (I − V Vᵀ) = G − U UᵀG − G V Vᵀ + U UᵀG V Vᵀ (U [n×k], V [d×k]; k may be 0).
at::Tensor OsftProject(const at::Tensor& g, const at::Tensor& u, const at::Tensor& v);
// Adaptive retained-rank ratios: Î_l = I_l / mean(I), r_l = clamp(mrr + Î_l (trr − mrr), mrr, trr).
std::vector<double> OsftAdaptiveRatios(const std::vector<double>& importance, double mrr = 0.1,
                                       double trr = 0.8);

// methods_pm.cc
// pm: Perturb-and-Merge with a LoRA per task (docs ALGORITHMS.md section 5).
// The closed-form merge coefficient, per module m (all tensors offsets from the same base):
//   α = Σ_m Σ_k (S_Fθ − S_F ⊙ θ̂_prev)_k Δ_k / Σ_m Σ_k (S_F ⊙ Δ²)_k, clamped to [0, 1],
// with S_F = Σ_i F_i and S_Fθ = Σ_i F_i ⊙ θ*_i summed over the past tasks AND the current one
// (this equals Σ_i Σ_k F_ik (θ*_ik − θ̂_k) Δ_k / Σ_i Σ_k F_ik Δ_k²). 0 when the denominator is 0.
double PmMergeCoefficient(const std::vector<at::Tensor>& fisher_sum,
                          const std::vector<at::Tensor>& fisher_theta_sum,
                          const std::vector<at::Tensor>& theta_prev, const std::vector<at::Tensor>& delta);

}  // namespace strata
