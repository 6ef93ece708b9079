#pragma once
// Low-rank side paths on linear layers (LoRA and its factorised variants).
//
// A LowRankAdapter computes y = s · b · (x Aᵀ) Bᵀ with B ∈ R^{n×r}, A ∈ R^{r×d}, s = alpha / r and
// a per-step branch multiplier b (1 by default; Perturb-and-Merge sets 1 ± ε). The factors are
// produced by Factors(), so a method can build them from other tensors on every forward (Share:
// B = β Eβ + Rβ1 Rβ2) and autograd flows back to whatever they are made of.
//
// LoraAdapter is the plain case: A and B are leaf tensors owned by the adapter (requires_grad set
// while trainable). Init follows PEFT: A ~ kaiming-uniform(a = √5), i.e. U(−1/√d, 1/√d); B = 0, so
// a fresh adapter reproduces the base layer exactly.
//
// Thread safety: Forward() is safe from several threads while nothing mutates the adapter
// (set_branch_scale, training steps). Fails by TORCH_CHECK (c10::Error) on shape mismatches.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>

#include "core/model/model.h"

namespace strata {

class LowRankAdapter : public LinearAdapter {
 public:
  explicit LowRankAdapter(double scaling) : scaling_(scaling) {}
  // (B [n×r], A [r×d]) as used by the next Forward().
  virtual std::pair<at::Tensor, at::Tensor> Factors() const = 0;

  // x [..., d] -> s · b · (x Aᵀ) Bᵀ [..., n], computed in the factors' dtype.
  at::Tensor Forward(const at::Tensor& x) override;
  // Factors() and s · b.
  bool LowRankFactors(at::Tensor* b, at::Tensor* a, double* scale) const override;
  // s · B A [n×d] (with autograd when the factors require grad; the branch scale is NOT applied).
  at::Tensor DeltaWeight() const;

  double scaling() const { return scaling_; }
  double branch_scale() const { return branch_scale_; }
  void set_branch_scale(double b) { branch_scale_ = b; }

 private:
  double scaling_;
  double branch_scale_ = 1.0;
};

class LoraAdapter : public LowRankAdapter {
 public:
  // Takes A [r×d] and B [n×r] as they are (no copy); scaling = alpha / r.
  LoraAdapter(at::Tensor a, at::Tensor b, double scaling);
  // A fresh adapter: A kaiming-uniform from a CPU generator seeded with `seed`, B = 0.
  static std::shared_ptr<LoraAdapter> Create(int64_t in_features, int64_t out_features, int64_t rank,
                                             double alpha, uint64_t seed, at::ScalarType dtype,
                                             at::Device device);

  std::pair<at::Tensor, at::Tensor> Factors() const override { return {b_, a_}; }
  const at::Tensor& a() const { return a_; }
  const at::Tensor& b() const { return b_; }
  void SetTrainable(bool trainable);

 private:
  at::Tensor a_;  // [r, d]
  at::Tensor b_;  // [n, r]
};

// A low-rank side path through a basis shared with other routes: y = s · ((x R) Cᵀ) Lᵀ with
// L [n×kl], C [kl×kr], R [d×kr] taken as they are (no copy). Share's task routes are these (L = β,
// R = α, C = the task's cumulative core), so a decode batch over many tasks runs one side path
// with a per-row core. Inference only (no trainable parameters).
class SharedBasisAdapter : public LowRankAdapter {
 public:
  SharedBasisAdapter(at::Tensor left, at::Tensor core, at::Tensor right, double scaling);
  // (L, C Rᵀ), computed on each call.
  std::pair<at::Tensor, at::Tensor> Factors() const override;
  at::Tensor Forward(const at::Tensor& x) override;
  bool SharedBasisFactors(at::Tensor* left, at::Tensor* core, at::Tensor* right,
                          double* scale) const override;

 private:
  at::Tensor left_, core_, right_;
};

// A deterministic per-module seed from a base seed and strings (module name, task name).
uint64_t DeriveSeed(uint64_t seed, const std::string& a, const std::string& b = "");
// The init seed of the fresh LoRA a method trains for `task` on `module`: the same for every method
// that trains one plain LoRA per task (share and share_ella with share_training "lora", ella,
// inc_lora, o_lora, pm), so that with one seed their runs start from the same factors (common random
// numbers: a benchmark then compares the methods, not their initialisations).
inline uint64_t TaskLoraSeed(uint64_t seed, const std::string& module, const std::string& task) {
  return DeriveSeed(seed, module, "lora/" + task);
}

// The uniform(−1/√d, 1/√d) kaiming init of a [rows × d] matrix (PEFT's LoRA A init), in float32
// on CPU from `seed`, then converted.
at::Tensor KaimingUniform(int64_t rows, int64_t d, uint64_t seed, at::ScalarType dtype, at::Device device);

}  // namespace strata
