// OSFT: adaptive-SVD full fine-tuning ("Sculpting Subspaces"), docs ALGORITHMS.md section 4.
//
// Task start: per target module, U S Vᵀ = svd(W) of the current (served) weights in fp32; the top
// k_l directions U_h [n×k], V_h [d×k] are frozen. The whole weight is trainable (a fresh leaf in the
// working model's slot, as seq_ft with ft_scope "target"). Every step the gradient is projected
// (BeforeOptimizerStep) and, since Adam's update is not a linear function of the gradient, so is
// the applied update (AfterOptimizerStep: W ← W0_task + P(W − W0_task)); hence U_hᵀ ΔW = 0 and
// ΔW V_h = 0 for the whole task. k_l = 0 skips both projections (= seq_ft "target" exactly).
//
// Ranks: k_l = floor(min(n, d) · r_l). "uniform": r_l = 1 − URR. "adaptive": r_l from the
// importance I_l measured in AfterTraining on the just-finished task's data (used by the NEXT
// task; the first task uses the uniform ratio). I_l = mean over tokens of the cosine similarity
// between the layer's input x and output y = x Wᵀ (+ bias); for non-square layers (n ≠ d) x and y
// live in different spaces, so we compare x with the output mapped back to the input space, Wᵀ y
// (our choice; documented in the state's "importance_measure").
//
// Served weights = the fine-tuned weights (no extra parameters per task). State: the trained target
// weights ("param/<module>.weight") and, in "extra", the ratios r_l for the next task.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/adapt/method.h"
#include "core/adapt/methods.h"
#include "core/util/status_macros.h"

namespace strata {

at::Tensor OsftProject(const at::Tensor& g, const at::Tensor& u, const at::Tensor& v) {
  at::Tensor out = g;
  if (u.defined() && u.size(1) > 0) out = out - at::matmul(u, at::matmul(u.t(), out));
  if (v.defined() && v.size(1) > 0) out = out - at::matmul(at::matmul(out, v), v.t());
  return out;
}

std::vector<double> OsftAdaptiveRatios(const std::vector<double>& importance, double mrr, double trr) {
  std::vector<double> out(importance.size(), trr);
  if (importance.empty()) return out;
  double mean = 0;
  for (double x : importance) mean += x;
  mean /= static_cast<double>(importance.size());
  for (size_t i = 0; i < importance.size(); ++i) {
    const double norm = std::abs(mean) > 1e-12 ? importance[i] / mean : 1.0;
    double r = mrr + norm * (trr - mrr);
    if (!std::isfinite(r)) r = trr;
    out[i] = std::clamp(r, mrr, trr);
  }
  return out;
}

namespace {

using json = nlohmann::json;

// Records the layer's inputs during the importance pass; adds nothing to the output.
class RecordingAdapter : public LinearAdapter {
 public:
  explicit RecordingAdapter(int64_t out_features) : out_features_(out_features) {}
  at::Tensor Forward(const at::Tensor& x) override {
    inputs.push_back(x.detach().reshape({-1, x.size(-1)}).to(at::kFloat));
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = out_features_;
    return at::zeros(shape, x.options());
  }
  std::vector<at::Tensor> inputs;

 private:
  int64_t out_features_;
};

class OsftMethod : public Method {
 public:
  explicit OsftMethod(const MethodConfig& config) : Method(config) {}
  std::string name() const override { return "osft"; }

  std::vector<std::pair<std::string, at::Tensor>> TrainableParameters() const override { return active_; }

  absl::Status ApplyServedWeights(CausalLM* base) const override {
    for (const auto& [pname, value] : params_) {
      at::Tensor* slot = base->FindParameter(pname);
      if (slot == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": the model has no parameter \"", pname, "\""));
      }
      if (!slot->sizes().equals(value.sizes())) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": parameter \"", pname, "\" has a different shape than the state"));
      }
    }
    at::NoGradGuard no_grad;
    for (const auto& [pname, value] : params_) {
      at::Tensor* slot = base->FindParameter(pname);
      *slot = value.to(slot->device(), slot->scalar_type());
    }
    return absl::OkStatus();
  }

  // The frozen ranks of the active task (tests).
  const std::vector<int64_t>& active_ranks() const { return ks_; }

  void BeforeOptimizerStep(StepContext& ctx) override {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < active_.size(); ++i) {
      if (ks_[i] == 0) continue;
      at::Tensor& p = active_[i].second;
      if (!p.grad().defined()) continue;
      at::Tensor g = p.grad();
      g.copy_(OsftProject(g.to(at::kFloat), u_[i], v_[i]).to(g.scalar_type()));
    }
  }

  void AfterOptimizerStep(StepContext& ctx) override {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < active_.size(); ++i) {
      if (ks_[i] == 0) continue;
      at::Tensor& p = active_[i].second;
      at::Tensor delta = p.to(at::kFloat) - w0_[i];
      p.copy_((w0_[i] + OsftProject(delta, u_[i], v_[i])).to(p.scalar_type()));
    }
  }

  absl::Status AfterTraining(TaskContext& ctx) override {
    pending_ratios_.clear();
    if (config_.osft_rank != "adaptive") return absl::OkStatus();
    at::NoGradGuard no_grad;
    std::vector<std::shared_ptr<RecordingAdapter>> recorders;
    std::vector<LinearLayer*> layers;
    for (const auto& m : modules_) {
      LinearLayer* layer = ctx.model->FindLinear(m);
      if (layer == nullptr) return absl::InternalError(absl::StrCat(name(), ": lost module ", m));
      auto rec = std::make_shared<RecordingAdapter>(layer->weight.size(0));
      layer->adapter = rec;
      layers.push_back(layer);
      recorders.push_back(std::move(rec));
    }
    absl::Status status = ctx.for_each_batch(0, kImportanceBatches,
                                             [](const at::Tensor&, int64_t) { return absl::OkStatus(); });
    for (LinearLayer* layer : layers) layer->adapter.reset();
    RETURN_IF_ERROR(status);
    std::vector<double> importance;
    for (size_t i = 0; i < layers.size(); ++i) {
      if (recorders[i]->inputs.empty()) {
        importance.push_back(0.0);
        continue;
      }
      at::Tensor x = at::cat(recorders[i]->inputs, 0);
      at::Tensor w = layers[i]->weight.detach().to(x.device(), at::kFloat);
      at::Tensor y = at::matmul(x, w.t());
      if (layers[i]->bias.defined()) y = y + layers[i]->bias.detach().to(x.device(), at::kFloat);
      at::Tensor other = w.size(0) == w.size(1) ? y : at::matmul(y, w);  // Wᵀ y for n ≠ d
      at::Tensor cos = at::cosine_similarity(x, other, 1, 1e-8);
      importance.push_back(cos.mean().item<double>());
    }
    pending_importance_ = importance;
    pending_ratios_ = OsftAdaptiveRatios(importance);
    return absl::OkStatus();
  }

 protected:
  static constexpr int64_t kImportanceBatches = 16;

  double Ratio(size_t i) const {
    if (config_.osft_rank == "adaptive" && i < ratios_.size()) return ratios_[i];
    return 1.0 - config_.osft_urr;
  }

  absl::Status DoBeginTask(const std::string& task_name, CausalLM* model) override {
    at::NoGradGuard no_grad;
    ClearActive();
    for (size_t i = 0; i < modules_.size(); ++i) {
      const std::string pname = modules_[i] + ".weight";
      at::Tensor* slot = model->FindParameter(pname);
      if (slot == nullptr) {
        ClearActive();
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": the model has no parameter \"", pname, "\""));
      }
      const int64_t n = slot->size(0), d = slot->size(1);
      const int64_t k = std::clamp<int64_t>(
          static_cast<int64_t>(std::floor(static_cast<double>(std::min(n, d)) * Ratio(i) + 1e-9)), 0,
          std::min(n, d));
      at::Tensor w = slot->detach().to(at::kFloat);
      at::Tensor u, v;
      if (k > 0) {
        auto [uu, s, vh] = torch::linalg::svd(w, false, c10::nullopt);
        u = uu.narrow(1, 0, k).contiguous();
        v = vh.narrow(0, 0, k).t().contiguous();
      }
      at::Tensor trainable = slot->detach().clone();
      trainable.requires_grad_(true);
      *slot = trainable;
      active_.emplace_back(pname, trainable);
      w0_.push_back(w.clone());
      u_.push_back(u);
      v_.push_back(v);
      ks_.push_back(k);
    }
    return absl::OkStatus();
  }

  absl::Status DoEndTask(const std::string& task_name, CausalLM* model) override {
    std::map<std::string, at::Tensor> params = params_;
    for (const auto& [pname, t] : active_) {
      if (!at::isfinite(t.detach()).all().item<bool>()) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": parameter ", pname, " has non-finite values"));
      }
    }
    for (const auto& [pname, t] : active_) {
      at::Tensor* slot = model->FindParameter(pname);
      TORCH_CHECK(slot != nullptr, name(), ": the working model lost parameter ", pname);
      *slot = t.detach();
      params[pname] = *slot;
    }
    params_ = std::move(params);
    if (!pending_ratios_.empty()) {
      ratios_ = pending_ratios_;
      importance_ = pending_importance_;
    }
    ClearActive();
    return absl::OkStatus();
  }

  void DoAbortTask() override { ClearActive(); }

  void ExportTensors(std::map<std::string, at::Tensor>* tensors, std::string* extra) const override {
    for (const auto& [pname, t] : params_) (*tensors)["param/" + pname] = t.to(at::kCPU).contiguous();
    json j;
    j["ratios"] = ratios_;
    j["importance"] = importance_;
    j["importance_measure"] = "mean cos(x, y) (n == d) or cos(x, W^T y) (n != d)";
    *extra = j.dump();
  }

  absl::Status ImportTensors(const std::map<std::string, at::Tensor>& tensors,
                             const std::string& extra) override {
    std::map<std::string, at::Tensor> params;
    for (const auto& [key, t] : tensors) {
      if (key.rfind("param/", 0) != 0) {
        return absl::InvalidArgumentError(absl::StrCat(name(), " state: unexpected tensor \"", key, "\""));
      }
      if (!t.defined() || !at::isFloatingType(t.scalar_type()) || t.dim() != 2) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), " state: tensor \"", key, "\" is not a floating-point matrix"));
      }
      params[key.substr(6)] = t.detach().to(at::kCPU).clone();
    }
    // Every committed task trains every target weight: all of them must be there, with their shapes.
    if (!tasks_.empty()) {
      for (size_t i = 0; i < modules_.size(); ++i) {
        auto it = params.find(modules_[i] + ".weight");
        if (it == params.end()) {
          return absl::InvalidArgumentError(
              absl::StrCat(name(), " state: missing tensor \"param/", modules_[i], ".weight\""));
        }
        if (i < module_shapes_.size() && (it->second.size(0) != module_shapes_[i].first ||
                                          it->second.size(1) != module_shapes_[i].second)) {
          return absl::InvalidArgumentError(
              absl::StrCat(name(), " state: tensor \"param/", modules_[i], ".weight\" has the wrong shape"));
        }
      }
    }
    if (params.size() != (tasks_.empty() ? 0 : modules_.size())) {
      return absl::InvalidArgumentError(absl::StrCat(name(), " state: unexpected \"param/\" tensors"));
    }
    std::vector<double> ratios, importance;
    json j = json::parse(extra.empty() ? std::string("{}") : extra, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(name(), " state: extra is not a JSON object"));
    }
    for (const char* field : {"ratios", "importance"}) {
      if (!j.contains(field)) continue;
      if (!j[field].is_array()) {
        return absl::InvalidArgumentError(absl::StrCat(name(), " state: \"", field, "\" must be a list"));
      }
      for (const json& e : j[field]) {
        if (!e.is_number()) {
          return absl::InvalidArgumentError(
              absl::StrCat(name(), " state: \"", field, "\" must hold numbers"));
        }
        (std::string(field) == "ratios" ? ratios : importance).push_back(e.get<double>());
      }
    }
    if (!ratios.empty() && ratios.size() != modules_.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(name(), " state: ", ratios.size(), " ratios for ", modules_.size(), " modules"));
    }
    params_ = std::move(params);
    ratios_ = std::move(ratios);
    importance_ = std::move(importance);
    ClearActive();
    return absl::OkStatus();
  }

 private:
  void ClearActive() {
    active_.clear();
    w0_.clear();
    u_.clear();
    v_.clear();
    ks_.clear();
    pending_ratios_.clear();
    pending_importance_.clear();
  }

  std::map<std::string, at::Tensor> params_;  // committed trained target weights
  std::vector<double> ratios_;                // adaptive r_l for the next task (empty: uniform)
  std::vector<double> importance_;            // I_l behind ratios_
  // Active task.
  std::vector<std::pair<std::string, at::Tensor>> active_;
  std::vector<at::Tensor> w0_, u_, v_;  // fp32: weights at task start, frozen bases
  std::vector<int64_t> ks_;
  std::vector<double> pending_ratios_, pending_importance_;
};

// ---- registration ----------------------------------------------------------------------------------

const MethodRegistrar kOsft(
    MethodDescriptor("osft", 8, "OSFT: full fine-tuning orthogonal to each weight's top singular directions",
                     {"osft_urr", "osft_rank"}),
    [](const MethodConfig& c) { return std::unique_ptr<Method>(new OsftMethod(c)); },
    {NumberOption("osft_urr", &MethodConfig::osft_urr, "OSFT: unfreeze-rank ratio", 0, 1),
     ChoiceOption("osft_rank", &MethodConfig::osft_rank, "OSFT: per-layer frozen rank, uniform or adaptive",
                  {"uniform", "adaptive"})});

}  // namespace
}  // namespace strata
