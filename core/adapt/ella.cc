#include "core/adapt/ella.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

using json = nlohmann::json;
constexpr char kFormat[] = "strata.ella.v1";

std::string Shape(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) absl::StrAppend(&s, i ? ", " : "", t.size(i));
  return s + "]";
}

}  // namespace

absl::Status EllaOptions::Validate() const {
  if (!(std::isfinite(lambda) && lambda >= 0.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("EllaOptions.lambda must be finite and >= 0, got ", lambda));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// LoraFactors

LoraFactors LoraFactors::Init(int64_t out_features, int64_t in_features, int64_t r, double lora_alpha,
                              uint64_t seed, at::Device device) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  LoraFactors f;
  f.a = at::rand({r, in_features}, gen, at::TensorOptions().dtype(at::kFloat)).mul(2.0).sub(1.0).mul(bound);
  f.b = at::zeros({out_features, r}, at::TensorOptions().dtype(at::kFloat));
  f.a = f.a.to(device).detach().requires_grad_(true);
  f.b = f.b.to(device).detach().requires_grad_(true);
  f.scale = lora_alpha / static_cast<double>(r);
  return f;
}

std::vector<std::pair<std::string, at::Tensor>> LoraFactors::NamedParameters() const {
  return {{"a", a}, {"b", b}};
}

std::vector<at::Tensor> LoraFactors::Parameters() const { return {a, b}; }

at::Tensor LoraFactors::Delta() const { return b.mm(a).mul(scale); }

at::Tensor LoraFactors::Forward(const at::Tensor& x) const {
  at::Tensor xf = x.to(a.device(), a.scalar_type());
  at::Tensor y = at::matmul(at::matmul(xf, a.t()), b.t()).mul(scale);
  return y.to(x.device(), x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// EllaModule

absl::StatusOr<EllaModule> EllaModule::Create(int64_t out_features, int64_t in_features,
                                              const EllaOptions& options) {
  RETURN_IF_ERROR(options.Validate());
  if (out_features < 1 || in_features < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("EllaModule: bad layer size out_features=", out_features, " in_features=", in_features));
  }
  EllaModule m;
  m.n_ = out_features;
  m.d_ = in_features;
  m.options_ = options;
  m.w_past_ = at::zeros({out_features, in_features}, at::TensorOptions().dtype(at::kFloat));
  return m;
}

absl::StatusOr<EllaModule> EllaModule::FromPast(const at::Tensor& w_past, const EllaOptions& options,
                                                int64_t num_merged) {
  RETURN_IF_ERROR(options.Validate());
  if (!w_past.defined() || w_past.dim() != 2 || w_past.size(0) < 1 || w_past.size(1) < 1 ||
      w_past.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(
        absl::StrCat("ELLA: W_past must be a float32 matrix, got ", Shape(w_past)));
  }
  if (num_merged < 0) return absl::InvalidArgumentError("ELLA: negative number of merged tasks");
  at::NoGradGuard no_grad;
  if (!at::isfinite(w_past).all().item<bool>()) {
    return absl::InvalidArgumentError("ELLA: W_past has non-finite values");
  }
  EllaModule m;
  m.n_ = w_past.size(0);
  m.d_ = w_past.size(1);
  m.options_ = options;
  m.num_merged_ = num_merged;
  m.w_past_ = w_past.detach();
  m.UpdateRms();
  return m;
}

void EllaModule::UpdateRms() {
  at::NoGradGuard no_grad;
  rms_ = std::sqrt(w_past_.to(at::kDouble).square().mean().item<double>());
}

at::Tensor EllaModule::NormalizedPast() const {
  at::NoGradGuard no_grad;
  if (rms_ == 0.0) return at::zeros_like(w_past_);
  return w_past_.div(rms_);
}

void EllaModule::To(at::Device device) { w_past_ = w_past_.to(device); }

at::Tensor EllaModule::Penalty(const at::Tensor& delta) const {
  TORCH_CHECK(delta.dim() == 2 && delta.size(0) == n_ && delta.size(1) == d_,
              "ELLA penalty: delta has shape ", delta.sizes(), ", expected [", n_, ", ", d_, "]");
  if (rms_ == 0.0 || options_.lambda == 0.0) return delta.sum().mul(0.0);
  at::Tensor past = w_past_.to(delta.device(), delta.scalar_type());
  // λ‖ΔW ⊙ W_past / rms‖² = (λ / rms²) · Σ (ΔW ⊙ W_past)².
  return delta.mul(past).square().sum().mul(options_.lambda / (rms_ * rms_));
}

absl::Status EllaModule::Merge(const at::Tensor& delta) {
  if (!delta.defined() || delta.dim() != 2 || delta.size(0) != n_ || delta.size(1) != d_) {
    return absl::InvalidArgumentError(
        absl::StrCat("ELLA merge: delta has shape ", Shape(delta), ", expected [", n_, ", ", d_, "]"));
  }
  at::NoGradGuard no_grad;
  at::Tensor update = delta.detach().to(w_past_.device(), at::kFloat);
  if (!at::isfinite(update).all().item<bool>()) {
    return absl::InvalidArgumentError("ELLA merge: delta has non-finite values");
  }
  w_past_ = w_past_.add(update);  // new tensor: views handed out earlier keep the old value
  ++num_merged_;
  UpdateRms();
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> EllaModule::ServedWeight(const at::Tensor& w0) const {
  if (!w0.defined() || w0.dim() != 2 || w0.size(0) != n_ || w0.size(1) != d_) {
    return absl::InvalidArgumentError(
        absl::StrCat("ELLA served weight: W0 has shape ", Shape(w0), ", expected [", n_, ", ", d_, "]"));
  }
  at::NoGradGuard no_grad;
  return w0.to(at::kFloat).add(w_past_.to(w0.device())).to(w0.scalar_type());
}

void EllaModule::ExportState(const std::string& prefix, std::map<std::string, at::Tensor>* tensors) const {
  (*tensors)[prefix + "w_past"] = w_past_.to(at::kCPU).contiguous();
}

std::string EllaModule::ConfigJson() const {
  json j;
  j["format"] = kFormat;
  j["out_features"] = n_;
  j["in_features"] = d_;
  j["lambda"] = options_.lambda;
  j["num_merged"] = num_merged_;
  return j.dump();
}

absl::StatusOr<EllaModule> EllaModule::ImportState(const std::string& config_json, const std::string& prefix,
                                                   const std::map<std::string, at::Tensor>& tensors) {
  json j = json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ELLA state config for '", prefix, "' is not a JSON object"));
  }
  auto get_int = [&](const char* name) -> absl::StatusOr<int64_t> {
    auto it = j.find(name);
    if (it == j.end() || !it->is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat("ELLA state config: field '", name, "' missing or not an integer"));
    }
    return it->get<int64_t>();
  };
  auto fmt = j.find("format");
  if (fmt == j.end() || !fmt->is_string() || fmt->get<std::string>() != kFormat) {
    return absl::InvalidArgumentError(
        absl::StrCat("ELLA state config: field 'format' must be '", kFormat, "'"));
  }
  auto lam = j.find("lambda");
  if (lam == j.end() || !lam->is_number()) {
    return absl::InvalidArgumentError("ELLA state config: field 'lambda' missing or not a number");
  }
  EllaOptions options;
  options.lambda = lam->get<double>();
  ASSIGN_OR_RETURN(int64_t n, get_int("out_features"));
  ASSIGN_OR_RETURN(int64_t d, get_int("in_features"));
  ASSIGN_OR_RETURN(int64_t merged, get_int("num_merged"));
  ASSIGN_OR_RETURN(EllaModule m, Create(n, d, options));
  if (merged < 0) return absl::InvalidArgumentError("ELLA state config: negative 'num_merged'");
  const std::string key = prefix + "w_past";
  auto it = tensors.find(key);
  if (it == tensors.end() || !it->second.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("ELLA state: missing tensor '", key, "'"));
  }
  const at::Tensor& t = it->second;
  if (t.dim() != 2 || t.size(0) != n || t.size(1) != d || !at::isFloatingType(t.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat("ELLA state: tensor '", key, "' has shape ", Shape(t),
                                                   ", expected floating [", n, ", ", d, "]"));
  }
  at::NoGradGuard no_grad;
  at::Tensor w = t.detach().to(at::kCPU, at::kFloat).clone().contiguous();
  if (!at::isfinite(w).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat("ELLA state: tensor '", key, "' has non-finite values"));
  }
  m.w_past_ = w;
  m.num_merged_ = merged;
  m.UpdateRms();
  return m;
}

}  // namespace strata
