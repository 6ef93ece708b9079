#pragma once
// Fixed side paths for the model tests: a task route's LoRA and Share's shared-basis route, with
// or without their factors exposed to DecodeBatch and DecodeStep.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdint>
#include <utility>

#include "core/model/model.h"

namespace strata {

// A fixed low-rank side path y = (x Aᵀ) Bᵀ, like a task route's LoRA.
// With `expose` it offers its factors (LowRankFactors), so a mixed batch runs it in the
// concatenated two-GEMM path; without, through Forward per route.
class FixedLowRank : public LinearAdapter {
 public:
  FixedLowRank(int64_t in, int64_t out, int64_t rank, uint64_t seed, bool expose) : expose_(expose) {
    at::Generator gen = at::detail::createCPUGenerator(seed);
    a_ = at::randn({rank, in}, gen, at::kFloat) * 0.3;
    b_ = at::randn({out, rank}, gen, at::kFloat) * 0.3;
  }
  at::Tensor Forward(const at::Tensor& x) override { return at::linear(at::linear(x, a_).mul(0.5), b_); }
  bool LowRankFactors(at::Tensor* b, at::Tensor* a, double* scale) const override {
    *b = b_;
    *a = a_;
    *scale = 0.5;
    return expose_;
  }

 private:
  bool expose_;
  at::Tensor a_, b_;
};

// A route's side path through a basis shared by every route, y = s · ((x R) Cᵀ) Lᵀ (Share's task
// routes): L and R are the same tensors in every route, C is the route's own core.
class FixedSharedBasis : public LinearAdapter {
 public:
  FixedSharedBasis(at::Tensor left, at::Tensor right, at::Tensor core, double scale)
      : left_(std::move(left)), right_(std::move(right)), core_(std::move(core)), scale_(scale) {}
  at::Tensor Forward(const at::Tensor& x) override {
    return at::matmul(at::matmul(at::matmul(x, right_), core_.t()), left_.t()).mul(scale_);
  }
  bool SharedBasisFactors(at::Tensor* left, at::Tensor* core, at::Tensor* right,
                          double* scale) const override {
    *left = left_;
    *core = core_;
    *right = right_;
    *scale = scale_;
    return true;
  }

 private:
  at::Tensor left_, right_, core_;
  double scale_;
};

}  // namespace strata
