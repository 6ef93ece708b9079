// P&M: Perturb-and-Merge with LoRA, docs ALGORITHMS.md section 5.
//
// Task t trains a fresh LoRA per target module on top of the merged model θ̂_{t−1} (the served
// weights); the task vector is Δ_t = s·B A per module. Each step BeforeForward scales every active
// branch by one of 1, 1 + ε, 1 − ε (probability 1/3 each, StepContext::rng): a stochastic estimate
// of the Hessian term (ε²/3) Δᵀ H Δ at no extra forward/backward.
//
// AfterTraining: diagonal (empirical) Fisher of the new task at θ*_t w.r.t. the target weights, per
// target token: F_t = (1/n_b) Σ_b T_b (∂L̄_b/∂W)², with L̄_b the batch's mean loss over its T_b target
// tokens and ∂L/∂W = ∂L/∂ΔW (the layer computes x (W + ΔW)ᵀ), via TaskContext::for_each_batch (at
// most kFisherBatches batches), branch scale 1. With token gradients g of mean ≈ 0 at θ*_t,
// E[T_b (∂L̄_b/∂W)²] = E[g²]: the estimate does not depend on the batch count or the tokens per
// batch, so the Fisher of tasks with short and long answers (or of different sizes) are on one
// scale in the closed form below. (Until 2026-12 the sum Σ_b (∂L̄_b/∂W)² was used: it scales with
// n_b / T_b and gave tasks with long answers almost no weight.)
//
// Merge: α_t = Σ_i Σ_k F_ik (θ*_ik − θ̂_{t−1,k}) Δ_tk / Σ_i Σ_k F_ik Δ_tk², clamped to [0, 1], over the
// past tasks and the current one; θ̂_t = θ̂_{t−1} + α_t Δ_t. Storing each task's F_i and θ*_i would
// cost O(t · params); instead we keep S_F = Σ_i F_i and S_Fθ = Σ_i F_i ⊙ θ*_i (constant in t), which
// is all the closed form needs: numerator = Σ_k (S_Fθ − S_F ⊙ θ̂_{t−1})_k Δ_tk. θ is measured as an
// offset from the base weights W0 (θ = W0 + δ; W0 cancels in θ*_i − θ̂_{t−1}), so the state does
// not depend on W0: per module δ̂ (= W_past, the served offset), S_F and S_Fδ*.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/adapt/lora.h"
#include "core/adapt/method.h"
#include "core/adapt/methods.h"
#include "core/util/status_macros.h"

namespace strata {

double PmMergeCoefficient(const std::vector<at::Tensor>& fisher_sum,
                          const std::vector<at::Tensor>& fisher_theta_sum,
                          const std::vector<at::Tensor>& theta_prev, const std::vector<at::Tensor>& delta) {
  TORCH_CHECK(fisher_sum.size() == delta.size() && fisher_theta_sum.size() == delta.size() &&
                  theta_prev.size() == delta.size(),
              "PmMergeCoefficient: mismatched module counts");
  double num = 0, den = 0;
  for (size_t m = 0; m < delta.size(); ++m) {
    at::Tensor f = fisher_sum[m].to(at::kDouble);
    at::Tensor d = delta[m].to(at::kDouble);
    at::Tensor ft = fisher_theta_sum[m].to(at::kDouble);
    at::Tensor th = theta_prev[m].to(at::kDouble);
    num += ((ft - f * th) * d).sum().item<double>();
    den += (f * d * d).sum().item<double>();
  }
  if (!(den > 0) || !std::isfinite(num) || !std::isfinite(den)) return 0.0;
  return std::clamp(num / den, 0.0, 1.0);
}

namespace {

using json = nlohmann::json;

absl::StatusOr<at::Tensor> GetMatrix(const std::map<std::string, at::Tensor>& tensors, const std::string& key,
                                     int64_t rows, int64_t cols) {
  auto it = tensors.find(key);
  if (it == tensors.end() || !it->second.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("method state: missing tensor \"", key, "\""));
  }
  const at::Tensor& t = it->second;
  if (t.dim() != 2 || t.size(0) != rows || t.size(1) != cols || !at::isFloatingType(t.scalar_type())) {
    return absl::InvalidArgumentError(
        absl::StrCat("method state: tensor \"", key, "\" must be floating [", rows, ", ", cols, "]"));
  }
  at::Tensor out = t.detach().to(at::kCPU, at::kFloat).clone().contiguous();
  if (!at::isfinite(out).all().item<bool>()) {
    return absl::InvalidArgumentError(
        absl::StrCat("method state: tensor \"", key, "\" has non-finite values"));
  }
  return out;
}

class PmMethod : public Method {
 public:
  explicit PmMethod(const MethodConfig& config) : Method(config) {}
  std::string name() const override { return "pm"; }

  std::vector<std::pair<std::string, at::Tensor>> TrainableParameters() const override {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (size_t i = 0; i < adapters_.size(); ++i) {
      out.emplace_back(modules_[i] + ".lora_A", adapters_[i]->a());
      out.emplace_back(modules_[i] + ".lora_B", adapters_[i]->b());
    }
    return out;
  }

  void BeforeForward(StepContext& ctx) override {
    double b = 1.0;
    if (ctx.rng != nullptr) {
      std::uniform_int_distribution<int> pick(0, 2);
      const int c = pick(*ctx.rng);
      b = c == 0 ? 1.0 : c == 1 ? 1.0 + config_.pm_epsilon : 1.0 - config_.pm_epsilon;
    }
    SetBranchScale(b);
  }

  absl::Status AfterTraining(TaskContext& ctx) override {
    SetBranchScale(1.0);
    std::vector<at::Tensor> weights;
    std::vector<at::Tensor> saved;
    std::vector<LinearLayer*> layers;
    for (const auto& m : modules_) {
      LinearLayer* layer = ctx.model->FindLinear(m);
      if (layer == nullptr) return absl::InternalError(absl::StrCat(name(), ": lost module ", m));
      layers.push_back(layer);
      saved.push_back(layer->weight);
      // An alias leaf (shares storage, own autograd metadata): the served tensor is not touched.
      at::Tensor w = layer->weight.detach();
      w.requires_grad_(true);
      layer->weight = w;
      weights.push_back(w);
    }
    std::vector<at::Tensor> fisher;
    for (const auto& w : weights) fisher.push_back(at::zeros(w.sizes(), w.options().dtype(at::kFloat)));
    int64_t batches = 0;
    absl::Status status = ctx.for_each_batch(0, kFisherBatches, [&](const at::Tensor& loss, int64_t tokens) {
      auto grads = torch::autograd::grad({loss}, weights, {}, false, false, true);
      at::NoGradGuard g;
      const double weight = static_cast<double>(std::max<int64_t>(tokens, 1));
      for (size_t i = 0; i < grads.size(); ++i) {
        if (grads[i].defined()) fisher[i].add_(grads[i].to(at::kFloat).square().mul(weight));
      }
      ++batches;
      return absl::OkStatus();
    });
    for (size_t i = 0; i < layers.size(); ++i) layers[i]->weight = saved[i];
    RETURN_IF_ERROR(status);
    if (batches > 0) {
      for (auto& f : fisher) f.div_(static_cast<double>(batches));
    }
    pending_fisher_.clear();
    for (auto& f : fisher) pending_fisher_.push_back(f.to(at::kCPU));
    return absl::OkStatus();
  }

  absl::Status ApplyServedWeights(CausalLM* base) const override {
    if (past_.empty()) return absl::OkStatus();
    for (size_t i = 0; i < modules_.size(); ++i) {
      const LinearLayer* layer = base->FindLinear(modules_[i]);
      if (layer == nullptr || layer->weight.size(0) != module_shapes_[i].first ||
          layer->weight.size(1) != module_shapes_[i].second) {
        return absl::InvalidArgumentError(absl::StrCat(name(), ": the model has no linear layer \"",
                                                       modules_[i], "\" of the state's shape"));
      }
    }
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < modules_.size(); ++i) AddToWeight(base->FindLinear(modules_[i]), past_[i]);
    return absl::OkStatus();
  }

  // The merge coefficients of the committed tasks, in order.
  const std::vector<double>& alphas() const { return alphas_; }

 protected:
  static constexpr int64_t kFisherBatches = 32;
  double scale() const { return config_.alpha / static_cast<double>(config_.rank); }

  void SetBranchScale(double b) {
    for (auto& a : adapters_) a->set_branch_scale(b);
  }

  absl::Status DoBeginTask(const std::string& task_name, CausalLM* model) override {
    at::NoGradGuard no_grad;
    adapters_.clear();
    pending_fisher_.clear();
    for (size_t i = 0; i < modules_.size(); ++i) {
      LinearLayer* layer = model->FindLinear(modules_[i]);
      if (layer == nullptr) {
        adapters_.clear();
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": the model has no linear layer ", modules_[i]));
      }
      auto adapter = LoraAdapter::Create(module_shapes_[i].second, module_shapes_[i].first, config_.rank,
                                         config_.alpha, TaskLoraSeed(config_.seed, modules_[i], task_name),
                                         at::kFloat, layer->weight.device());
      adapter->SetTrainable(true);
      layer->adapter = adapter;
      adapters_.push_back(std::move(adapter));
    }
    return absl::OkStatus();
  }

  absl::Status DoEndTask(const std::string& task_name, CausalLM* model) override {
    at::NoGradGuard no_grad;
    SetBranchScale(1.0);
    const size_t nm = modules_.size();
    std::vector<at::Tensor> delta, prev, fsum, fdsum;
    for (size_t i = 0; i < nm; ++i) {
      at::Tensor d = adapters_[i]->DeltaWeight().detach().to(at::kCPU, at::kFloat).contiguous();
      if (!at::isfinite(d).all().item<bool>()) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": task update of ", modules_[i], " is non-finite"));
      }
      const auto [n, dd] = module_shapes_[i];
      at::Tensor p = past_.empty() ? at::zeros({n, dd}, at::kFloat) : past_[i];
      // Without a Fisher pass (AfterTraining not run, e.g. driven by hand): uniform F = 1.
      at::Tensor f = pending_fisher_.size() == nm ? pending_fisher_[i] : at::ones({n, dd}, at::kFloat);
      at::Tensor fs = fisher_sum_.empty() ? f.clone() : fisher_sum_[i] + f;
      at::Tensor fds = fisher_delta_sum_.empty() ? f * (p + d) : fisher_delta_sum_[i] + f * (p + d);
      delta.push_back(d);
      prev.push_back(p);
      fsum.push_back(fs);
      fdsum.push_back(fds);
    }
    const double alpha = PmMergeCoefficient(fsum, fdsum, prev, delta);
    // What decided α_t (logged in the state and read by `strata bench cl`): the new task's own
    // curvature term ⟨F_t, Δ_t²⟩, the earlier tasks' ⟨Σ_{i<t} F_i, Δ_t²⟩ and the cross term
    // Σ_{i<t} ⟨F_i ⊙ (θ*_i − θ̂_{t−1}), Δ_t⟩; unclamped α = (own + cross) / (own + past).
    json terms;
    {
      double own = 0, past_term = 0, cross = 0, fisher_mean = 0, delta_sq = 0;
      int64_t entries = 0;
      for (size_t i = 0; i < nm; ++i) {
        at::Tensor d = delta[i].to(at::kDouble);
        at::Tensor f =
            (pending_fisher_.size() == nm ? pending_fisher_[i] : at::ones_like(delta[i])).to(at::kDouble);
        own += (f * d * d).sum().item<double>();
        if (!fisher_sum_.empty()) {
          at::Tensor fp = fisher_sum_[i].to(at::kDouble);
          past_term += (fp * d * d).sum().item<double>();
          cross += ((fisher_delta_sum_[i].to(at::kDouble) - fp * prev[i].to(at::kDouble)) * d)
                       .sum()
                       .item<double>();
        }
        fisher_mean += f.sum().item<double>();
        delta_sq += (d * d).sum().item<double>();
        entries += d.numel();
      }
      terms["own"] = own;
      terms["past"] = past_term;
      terms["cross"] = cross;
      terms["raw_alpha"] = own + past_term > 0 ? (own + cross) / (own + past_term) : 0.0;
      terms["fisher_mean"] = entries > 0 ? fisher_mean / static_cast<double>(entries) : 0.0;
      terms["delta_norm"] = std::sqrt(delta_sq);
    }
    std::vector<at::Tensor> past;
    for (size_t i = 0; i < nm; ++i) past.push_back((prev[i] + delta[i] * alpha).contiguous());
    for (size_t i = 0; i < nm; ++i) {
      LinearLayer* layer = model->FindLinear(modules_[i]);
      TORCH_CHECK(layer != nullptr, name(), ": the working model lost module ", modules_[i]);
      layer->adapter.reset();
      AddToWeight(layer, delta[i] * alpha);
    }
    past_ = std::move(past);
    fisher_sum_ = std::move(fsum);
    fisher_delta_sum_ = std::move(fdsum);
    alphas_.push_back(alpha);
    merge_terms_.push_back(std::move(terms));
    adapters_.clear();
    pending_fisher_.clear();
    return absl::OkStatus();
  }

  void DoAbortTask() override {
    adapters_.clear();
    pending_fisher_.clear();
  }

  void ExportTensors(std::map<std::string, at::Tensor>* tensors, std::string* extra) const override {
    for (size_t i = 0; i < past_.size(); ++i) {
      (*tensors)["pm/" + modules_[i] + "/w_past"] = past_[i];
      (*tensors)["pm/" + modules_[i] + "/fisher_sum"] = fisher_sum_[i];
      (*tensors)["pm/" + modules_[i] + "/fisher_theta_sum"] = fisher_delta_sum_[i];
    }
    json j;
    j["alphas"] = alphas_;
    j["merge_terms"] = merge_terms_;
    *extra = j.dump();
  }

  absl::Status ImportTensors(const std::map<std::string, at::Tensor>& tensors,
                             const std::string& extra) override {
    std::vector<at::Tensor> past, fs, fds;
    if (!tasks_.empty()) {
      for (size_t i = 0; i < modules_.size(); ++i) {
        const auto [n, d] = module_shapes_[i];
        ASSIGN_OR_RETURN(at::Tensor p, GetMatrix(tensors, "pm/" + modules_[i] + "/w_past", n, d));
        ASSIGN_OR_RETURN(at::Tensor f, GetMatrix(tensors, "pm/" + modules_[i] + "/fisher_sum", n, d));
        ASSIGN_OR_RETURN(at::Tensor fd, GetMatrix(tensors, "pm/" + modules_[i] + "/fisher_theta_sum", n, d));
        past.push_back(p);
        fs.push_back(f);
        fds.push_back(fd);
      }
    }
    std::vector<double> alphas;
    json j = json::parse(extra.empty() ? std::string("{}") : extra, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(name(), " state: extra is not a JSON object"));
    }
    if (j.contains("alphas")) {
      if (!j["alphas"].is_array())
        return absl::InvalidArgumentError(name() + " state: alphas must be a list");
      for (const json& e : j["alphas"]) {
        if (!e.is_number()) return absl::InvalidArgumentError(name() + " state: alphas must hold numbers");
        alphas.push_back(e.get<double>());
      }
    }
    json merge_terms = json::array();
    if (j.contains("merge_terms")) {  // absent in states written before it was logged
      if (!j["merge_terms"].is_array()) {
        return absl::InvalidArgumentError(name() + " state: merge_terms must be a list");
      }
      merge_terms = j["merge_terms"];
    }
    past_ = std::move(past);
    fisher_sum_ = std::move(fs);
    fisher_delta_sum_ = std::move(fds);
    alphas_ = std::move(alphas);
    merge_terms_ = std::move(merge_terms);
    adapters_.clear();
    pending_fisher_.clear();
    return absl::OkStatus();
  }

 private:
  // Committed, per module (empty before the first task), fp32 CPU.
  std::vector<at::Tensor> past_;              // δ̂_t = θ̂_t − W0
  std::vector<at::Tensor> fisher_sum_;        // Σ_i F_i
  std::vector<at::Tensor> fisher_delta_sum_;  // Σ_i F_i ⊙ δ*_i  (δ*_i = θ*_i − W0)
  std::vector<double> alphas_;
  json merge_terms_ = json::array();  // per task: own, past, cross, raw_alpha, fisher_mean, delta_norm
  // Active task.
  std::vector<std::shared_ptr<LoraAdapter>> adapters_;
  std::vector<at::Tensor> pending_fisher_;
};

// ---- registration ----------------------------------------------------------------------------------

MethodOption PmEpsilon() {
  MethodOption o =
      NumberOption("pm_epsilon", &MethodConfig::pm_epsilon,
                   "Perturb-and-Merge: perturbation size (the paper: 0.5; chosen on cl-small: 0.1)", 0, 1);
  o.per_task = true;
  return o;
}

const MethodRegistrar kPm(
    MethodDescriptor("pm", 9, "Perturb-and-Merge: a LoRA per task, merged with a Fisher-weighted coefficient",
                     {"pm_epsilon"}),
    [](const MethodConfig& c) { return std::unique_ptr<Method>(new PmMethod(c)); }, {PmEpsilon()});

}  // namespace
}  // namespace strata
