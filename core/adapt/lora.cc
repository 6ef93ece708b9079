#include "core/adapt/lora.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <tuple>

namespace strata {

at::Tensor LowRankAdapter::Forward(const at::Tensor& x) {
  auto [b, a] = Factors();
  const at::Tensor xin = x.scalar_type() == a.scalar_type() ? x : x.to(a.scalar_type());
  // Scale the rank-r intermediate (the smallest tensor on the path).
  return at::linear(at::linear(xin, a).mul(scaling_ * branch_scale_), b);
}

bool LowRankAdapter::LowRankFactors(at::Tensor* b, at::Tensor* a, double* scale) const {
  std::tie(*b, *a) = Factors();
  *scale = scaling_ * branch_scale_;
  return true;
}

at::Tensor LowRankAdapter::DeltaWeight() const {
  auto [b, a] = Factors();
  return at::matmul(b, a).mul(scaling_);
}

LoraAdapter::LoraAdapter(at::Tensor a, at::Tensor b, double scaling)
    : LowRankAdapter(scaling), a_(std::move(a)), b_(std::move(b)) {
  TORCH_CHECK(a_.dim() == 2 && b_.dim() == 2 && a_.size(0) == b_.size(1),
              "LoraAdapter: A must be [r, d] and B [n, r], got A ", a_.sizes(), " B ", b_.sizes());
}

SharedBasisAdapter::SharedBasisAdapter(at::Tensor left, at::Tensor core, at::Tensor right, double scaling)
    : LowRankAdapter(scaling), left_(std::move(left)), core_(std::move(core)), right_(std::move(right)) {
  TORCH_CHECK(left_.dim() == 2 && core_.dim() == 2 && right_.dim() == 2 && left_.size(1) == core_.size(0) &&
                  right_.size(1) == core_.size(1),
              "SharedBasisAdapter: L must be [n, kl], C [kl, kr] and R [d, kr], got L ", left_.sizes(), " C ",
              core_.sizes(), " R ", right_.sizes());
}

std::pair<at::Tensor, at::Tensor> SharedBasisAdapter::Factors() const {
  return {left_, at::matmul(core_, right_.t())};
}

at::Tensor SharedBasisAdapter::Forward(const at::Tensor& x) {
  const at::Tensor xin = x.scalar_type() == right_.scalar_type() ? x : x.to(right_.scalar_type());
  return at::matmul(at::matmul(at::matmul(xin, right_), core_.t()).mul(scaling() * branch_scale()),
                    left_.t());
}

bool SharedBasisAdapter::SharedBasisFactors(at::Tensor* left, at::Tensor* core, at::Tensor* right,
                                            double* scale) const {
  *left = left_;
  *core = core_;
  *right = right_;
  *scale = scaling() * branch_scale();
  return true;
}

std::shared_ptr<LoraAdapter> LoraAdapter::Create(int64_t in_features, int64_t out_features, int64_t rank,
                                                 double alpha, uint64_t seed, at::ScalarType dtype,
                                                 at::Device device) {
  TORCH_CHECK(rank > 0, "LoraAdapter: rank must be positive, got ", rank);
  at::Tensor a = KaimingUniform(rank, in_features, seed, dtype, device);
  at::Tensor b = at::zeros({out_features, rank}, at::TensorOptions().dtype(dtype).device(device));
  return std::make_shared<LoraAdapter>(std::move(a), std::move(b), alpha / static_cast<double>(rank));
}

void LoraAdapter::SetTrainable(bool trainable) {
  a_.requires_grad_(trainable);
  b_.requires_grad_(trainable);
}

uint64_t DeriveSeed(uint64_t seed, const std::string& a, const std::string& b) {
  // FNV-1a over the strings, mixed with the seed by splitmix64: stable across platforms/runs.
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&h](const std::string& s) {
    for (unsigned char c : s) {
      h ^= c;
      h *= 1099511628211ULL;
    }
    h ^= 0xff;
    h *= 1099511628211ULL;
  };
  mix(a);
  mix(b);
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL + h;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

at::Tensor KaimingUniform(int64_t rows, int64_t d, uint64_t seed, at::ScalarType dtype, at::Device device) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(d));
  at::Tensor t = at::empty({rows, d}, at::TensorOptions().dtype(at::kFloat)).uniform_(-bound, bound, gen);
  return t.to(at::TensorOptions().dtype(dtype).device(device));
}

}  // namespace strata
