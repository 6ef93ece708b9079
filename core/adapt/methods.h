#pragma once
// Constructors of the concrete methods (used by CreateMethod in method.cc; tests may call them).
// The configs are validated by CreateMethod; these do not validate again.

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "core/adapt/method.h"

namespace strata {

// methods_baseline.cc
// seq_lora: one LoRA (rank, alpha) carried across all tasks; served W0 + s·B A.
// With `joint` it is mtl's LoRA shape (named "mtl").
std::unique_ptr<Method> NewSeqLoraMethod(const MethodConfig& config, bool joint = false);
// inc_lora: a new LoRA per task, earlier ones frozen and merged; served W0 + Σ_i s·B_i A_i.
// o_lora: inc_lora + λ1 Σ_{i<t} Σ |A_i A_tᵀ|.
std::unique_ptr<Method> NewIncLoraMethod(const MethodConfig& config, bool orthogonal);
// seq_ft: full fine-tuning in sequence (ft_scope "all" or "target"). With `joint`: mtl full.
std::unique_ptr<Method> NewSeqFtMethod(const MethodConfig& config, bool joint = false);

// methods_share_ella.cc
// share (use_ella = false), ella (use_share = false), share_ella (both).
std::unique_ptr<Method> NewShareEllaMethod(const MethodConfig& config, bool use_share, bool use_ella);

// methods_osft.cc
// osft: full fine-tuning of the target weights constrained to the complement of the top-k_l
// singular directions of each weight at task start (docs ALGORITHMS.md section 4).
std::unique_ptr<Method> NewOsftMethod(const MethodConfig& config);
// P(G) = (I − U Uᵀ) G (I − V Vᵀ) = G − U UᵀG − G V Vᵀ + U UᵀG V Vᵀ (U [n×k], V [d×k]; k may be 0).
at::Tensor OsftProject(const at::Tensor& g, const at::Tensor& u, const at::Tensor& v);
// Adaptive retained-rank ratios: Î_l = I_l / mean(I), r_l = clamp(mrr + Î_l (trr − mrr), mrr, trr).
std::vector<double> OsftAdaptiveRatios(const std::vector<double>& importance, double mrr = 0.1,
                                       double trr = 0.8);

// methods_pm.cc
// pm: Perturb-and-Merge with a LoRA per task (docs ALGORITHMS.md section 5).
std::unique_ptr<Method> NewPmMethod(const MethodConfig& config);
// The closed-form merge coefficient, per module m (all tensors offsets from the same base):
//   α = Σ_m Σ_k (S_Fθ − S_F ⊙ θ̂_prev)_k Δ_k / Σ_m Σ_k (S_F ⊙ Δ²)_k, clamped to [0, 1],
// with S_F = Σ_i F_i and S_Fθ = Σ_i F_i ⊙ θ*_i summed over the past tasks AND the current one
// (this equals Σ_i Σ_k F_ik (θ*_ik − θ̂_k) Δ_k / Σ_i Σ_k F_ik Δ_k²). 0 when the denominator is 0.
double PmMergeCoefficient(const std::vector<at::Tensor>& fisher_sum,
                          const std::vector<at::Tensor>& fisher_theta_sum,
                          const std::vector<at::Tensor>& theta_prev, const std::vector<at::Tensor>& delta);

}  // namespace strata
