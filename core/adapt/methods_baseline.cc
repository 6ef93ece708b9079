// Baselines of docs ALGORITHMS.md section 6: seq_lora, inc_lora, o_lora, seq_ft, mtl.
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/adapt/lora.h"
#include "core/adapt/method.h"
#include "core/adapt/methods.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

absl::Status CheckFinite(const std::string& method, const std::string& what, const at::Tensor& t) {
  if (!at::isfinite(t).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat(method, ": ", what, " has non-finite values"));
  }
  return absl::OkStatus();
}

// Looks up a state tensor with the expected 2-D shape; converts to float32 CPU (copied).
absl::StatusOr<at::Tensor> GetMatrix(const std::map<std::string, at::Tensor>& tensors, const std::string& key,
                                     int64_t rows, int64_t cols) {
  auto it = tensors.find(key);
  if (it == tensors.end() || !it->second.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("method state: missing tensor \"", key, "\""));
  }
  const at::Tensor& t = it->second;
  if (t.dim() != 2 || (rows >= 0 && t.size(0) != rows) || (cols >= 0 && t.size(1) != cols) ||
      !at::isFloatingType(t.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat("method state: tensor \"", key, "\" has shape ",
                                                   ShapeString(t), ", expected floating [", rows, ", ", cols,
                                                   "]"));
  }
  at::Tensor out = t.detach().to(at::kCPU, at::kFloat).clone().contiguous();
  if (!at::isfinite(out).all().item<bool>()) {
    return absl::InvalidArgumentError(
        absl::StrCat("method state: tensor \"", key, "\" has non-finite values"));
  }
  return out;
}

LinearLayer* RequireLinear(CausalLM* model, const std::string& module, const std::string& method) {
  LinearLayer* layer = model->FindLinear(module);
  TORCH_CHECK(layer != nullptr, method, ": the model has no linear layer ", module);
  return layer;
}

// The end of a LoRA task (seq_lora, inc_lora, o_lora): the trained factors, detached to CPU and
// checked finite (an error before `model` is touched), then each module's adapter removed and
// s·B A added to its weight. Returns the factors per module.
absl::StatusOr<std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>> MergeLoraAdapters(
    const std::string& method, const std::vector<std::string>& modules,
    const std::vector<std::shared_ptr<LoraAdapter>>& adapters, double scale, CausalLM* model) {
  std::vector<at::Tensor> a, b;
  for (size_t i = 0; i < adapters.size(); ++i) {
    a.push_back(adapters[i]->a().detach().to(at::kCPU).contiguous());
    b.push_back(adapters[i]->b().detach().to(at::kCPU).contiguous());
    RETURN_IF_ERROR(CheckFinite(method, modules[i] + ".lora_A", a.back()));
    RETURN_IF_ERROR(CheckFinite(method, modules[i] + ".lora_B", b.back()));
  }
  for (size_t i = 0; i < modules.size(); ++i) {
    LinearLayer* layer = RequireLinear(model, modules[i], method);
    layer->adapter.reset();
    AddToWeight(layer, at::matmul(b[i], a[i]).mul(scale));
  }
  return std::make_pair(std::move(a), std::move(b));
}

absl::Status CheckBaseModules(const CausalLM& base, const std::vector<std::string>& modules,
                              const std::vector<std::pair<int64_t, int64_t>>& shapes,
                              const std::string& method) {
  for (size_t i = 0; i < modules.size(); ++i) {
    const LinearLayer* layer = base.FindLinear(modules[i]);
    if (layer == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(method, ": the model has no linear layer \"", modules[i], "\""));
    }
    if (layer->weight.size(0) != shapes[i].first || layer->weight.size(1) != shapes[i].second) {
      return absl::InvalidArgumentError(
          absl::StrCat(method, ": module \"", modules[i], "\" has weight ", ShapeString(layer->weight),
                       ", the method state expects [", shapes[i].first, ", ", shapes[i].second, "]"));
    }
  }
  return absl::OkStatus();
}

// ---- seq_lora (and mtl with the LoRA shape) ------------------------------------------------------
// Committed: one LoRA (A_m [r, d], B_m [n, r]) per module, served W0 + s·B A. A task continues from
// the committed LoRA: the working model's weight becomes W − s·B A (= W0) and the adapter starts
// from copies of A, B; EndTask installs W0 + s·B' A'.
class SeqLoraMethod : public Method {
 public:
  SeqLoraMethod(const MethodConfig& config, bool joint) : Method(config), joint_(joint) {}
  std::string name() const override { return joint_ ? "mtl" : "seq_lora"; }
  bool joint() const override { return joint_; }

  std::vector<std::pair<std::string, at::Tensor>> TrainableParameters() const override {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (size_t i = 0; i < adapters_.size(); ++i) {
      out.emplace_back(modules_[i] + ".lora_A", adapters_[i]->a());
      out.emplace_back(modules_[i] + ".lora_B", adapters_[i]->b());
    }
    return out;
  }

  absl::Status ApplyServedWeights(CausalLM* base) const override {
    if (a_.empty()) return absl::OkStatus();
    RETURN_IF_ERROR(CheckBaseModules(*base, modules_, module_shapes_, name()));
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < modules_.size(); ++i) {
      AddToWeight(base->FindLinear(modules_[i]), at::matmul(b_[i], a_[i]).mul(scale()));
    }
    return absl::OkStatus();
  }

 protected:
  double scale() const { return config_.alpha / static_cast<double>(config_.rank); }

  absl::Status DoBeginTask(const std::string& task_name, CausalLM* model) override {
    at::NoGradGuard no_grad;
    adapters_.clear();
    for (size_t i = 0; i < modules_.size(); ++i) {
      LinearLayer* layer = RequireLinear(model, modules_[i], name());
      std::shared_ptr<LoraAdapter> adapter;
      if (!a_.empty()) {
        const at::Device dev = layer->weight.device();
        at::Tensor a = a_[i].to(dev).clone();
        at::Tensor b = b_[i].to(dev).clone();
        AddToWeight(layer, at::matmul(b, a).mul(-scale()));  // back to W0
        adapter = std::make_shared<LoraAdapter>(a, b, scale());
      } else {
        adapter = LoraAdapter::Create(module_shapes_[i].second, module_shapes_[i].first, config_.rank,
                                      config_.alpha, DeriveSeed(config_.seed, modules_[i], name()),
                                      at::kFloat, layer->weight.device());
      }
      adapter->SetTrainable(true);
      layer->adapter = adapter;
      adapters_.push_back(std::move(adapter));
    }
    return absl::OkStatus();
  }

  absl::Status DoEndTask(const std::string& task_name, CausalLM* model) override {
    ASSIGN_OR_RETURN(auto factors, MergeLoraAdapters(name(), modules_, adapters_, scale(), model));
    a_ = std::move(factors.first);
    b_ = std::move(factors.second);
    adapters_.clear();
    return absl::OkStatus();
  }

  void DoAbortTask() override { adapters_.clear(); }

  void ExportTensors(std::map<std::string, at::Tensor>* tensors, std::string* extra) const override {
    for (size_t i = 0; i < a_.size(); ++i) {
      (*tensors)["lora/" + modules_[i] + "/A"] = a_[i];
      (*tensors)["lora/" + modules_[i] + "/B"] = b_[i];
    }
  }

  absl::Status ImportTensors(const std::map<std::string, at::Tensor>& tensors,
                             const std::string& extra) override {
    std::vector<at::Tensor> a, b;
    if (!tasks_.empty()) {
      for (size_t i = 0; i < modules_.size(); ++i) {
        const auto [n, d] = module_shapes_[i];
        ASSIGN_OR_RETURN(at::Tensor ta, GetMatrix(tensors, "lora/" + modules_[i] + "/A", config_.rank, d));
        ASSIGN_OR_RETURN(at::Tensor tb, GetMatrix(tensors, "lora/" + modules_[i] + "/B", n, config_.rank));
        a.push_back(ta);
        b.push_back(tb);
      }
    }
    a_ = std::move(a);
    b_ = std::move(b);
    adapters_.clear();
    return absl::OkStatus();
  }

 private:
  bool joint_;
  std::vector<at::Tensor> a_, b_;                       // committed, per module (empty before the first task)
  std::vector<std::shared_ptr<LoraAdapter>> adapters_;  // active task
};

// ---- inc_lora / o_lora -------------------------------------------------------------------------------
// Committed: per task and module a frozen LoRA; served W0 + Σ_i s·B_i A_i (each merged into the
// weights at its EndTask). A task trains a fresh LoRA on top of the served weights.
class IncLoraMethod : public Method {
 public:
  IncLoraMethod(const MethodConfig& config, bool orthogonal) : Method(config), orthogonal_(orthogonal) {}
  std::string name() const override { return orthogonal_ ? "o_lora" : "inc_lora"; }

  std::vector<std::pair<std::string, at::Tensor>> TrainableParameters() const override {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (size_t i = 0; i < adapters_.size(); ++i) {
      out.emplace_back(modules_[i] + ".lora_A", adapters_[i]->a());
      out.emplace_back(modules_[i] + ".lora_B", adapters_[i]->b());
    }
    return out;
  }

  // O-LoRA: λ1 Σ_modules Σ_{i<t} Σ |A_i A_tᵀ| with the earlier A_i stacked once per task.
  at::Tensor ExtraLoss() override {
    if (!orthogonal_ || past_a_.empty() || config_.olora_lambda == 0.0) return at::Tensor();
    at::Tensor total;
    for (size_t i = 0; i < adapters_.size(); ++i) {
      at::Tensor term = at::matmul(past_a_[i], adapters_[i]->a().t()).abs().sum();
      total = total.defined() ? total.add(term) : term;
    }
    return total.mul(config_.olora_lambda);
  }

  absl::Status ApplyServedWeights(CausalLM* base) const override {
    if (a_.empty()) return absl::OkStatus();
    RETURN_IF_ERROR(CheckBaseModules(*base, modules_, module_shapes_, name()));
    at::NoGradGuard no_grad;
    for (size_t m = 0; m < modules_.size(); ++m) {
      std::vector<at::Tensor> as, bs;
      for (size_t t = 0; t < a_.size(); ++t) {
        as.push_back(a_[t][m]);
        bs.push_back(b_[t][m]);
      }
      // Σ_i B_i A_i = [B_1 … B_t] [A_1; …; A_t]: one GEMM.
      AddToWeight(base->FindLinear(modules_[m]), at::matmul(at::cat(bs, 1), at::cat(as, 0)).mul(scale()));
    }
    return absl::OkStatus();
  }

  bool SupportsTaskRouting() const override { return true; }
  absl::Status ApplyTaskRouting(const std::string& task, CausalLM* base) const override {
    auto it = std::find(tasks_.begin(), tasks_.end(), task);
    if (it == tasks_.end()) return absl::NotFoundError(absl::StrCat(name(), ": unknown task \"", task, "\""));
    RETURN_IF_ERROR(CheckBaseModules(*base, modules_, module_shapes_, name()));
    // The model as of task t: its own LoRA and every earlier one (it trained on top of them), as one
    // side path of rank r·(t+1).
    const size_t t = static_cast<size_t>(it - tasks_.begin());
    for (size_t m = 0; m < modules_.size(); ++m) {
      std::vector<at::Tensor> as, bs;
      for (size_t i = 0; i <= t; ++i) {
        as.push_back(a_[i][m]);
        bs.push_back(b_[i][m]);
      }
      LinearLayer* layer = base->FindLinear(modules_[m]);
      const at::Device dev = layer->weight.device();
      layer->adapter = std::make_shared<LoraAdapter>(at::cat(as, 0).to(dev), at::cat(bs, 1).to(dev), scale());
    }
    return absl::OkStatus();
  }

 protected:
  double scale() const { return config_.alpha / static_cast<double>(config_.rank); }

  absl::Status DoBeginTask(const std::string& task_name, CausalLM* model) override {
    at::NoGradGuard no_grad;
    adapters_.clear();
    past_a_.clear();
    for (size_t i = 0; i < modules_.size(); ++i) {
      LinearLayer* layer = RequireLinear(model, modules_[i], name());
      auto adapter = LoraAdapter::Create(module_shapes_[i].second, module_shapes_[i].first, config_.rank,
                                         config_.alpha, TaskLoraSeed(config_.seed, modules_[i], task_name),
                                         at::kFloat, layer->weight.device());
      adapter->SetTrainable(true);
      layer->adapter = adapter;
      adapters_.push_back(std::move(adapter));
      if (orthogonal_ && !a_.empty()) {
        std::vector<at::Tensor> as;
        for (const auto& task_a : a_) as.push_back(task_a[i]);
        past_a_.push_back(at::cat(as, 0).to(layer->weight.device()));  // [r·(t−1), d], frozen
      }
    }
    return absl::OkStatus();
  }

  absl::Status DoEndTask(const std::string& task_name, CausalLM* model) override {
    ASSIGN_OR_RETURN(auto factors, MergeLoraAdapters(name(), modules_, adapters_, scale(), model));
    a_.push_back(std::move(factors.first));
    b_.push_back(std::move(factors.second));
    adapters_.clear();
    past_a_.clear();
    return absl::OkStatus();
  }

  void DoAbortTask() override {
    adapters_.clear();
    past_a_.clear();
  }

  void ExportTensors(std::map<std::string, at::Tensor>* tensors, std::string* extra) const override {
    for (size_t t = 0; t < a_.size(); ++t) {
      for (size_t m = 0; m < modules_.size(); ++m) {
        (*tensors)[absl::StrCat("task", t, "/", modules_[m], "/A")] = a_[t][m];
        (*tensors)[absl::StrCat("task", t, "/", modules_[m], "/B")] = b_[t][m];
      }
    }
  }

  absl::Status ImportTensors(const std::map<std::string, at::Tensor>& tensors,
                             const std::string& extra) override {
    std::vector<std::vector<at::Tensor>> a(tasks_.size()), b(tasks_.size());
    for (size_t t = 0; t < tasks_.size(); ++t) {
      for (size_t m = 0; m < modules_.size(); ++m) {
        const auto [n, d] = module_shapes_[m];
        ASSIGN_OR_RETURN(at::Tensor ta, GetMatrix(tensors, absl::StrCat("task", t, "/", modules_[m], "/A"),
                                                  config_.rank, d));
        ASSIGN_OR_RETURN(at::Tensor tb, GetMatrix(tensors, absl::StrCat("task", t, "/", modules_[m], "/B"), n,
                                                  config_.rank));
        a[t].push_back(ta);
        b[t].push_back(tb);
      }
    }
    a_ = std::move(a);
    b_ = std::move(b);
    adapters_.clear();
    past_a_.clear();
    return absl::OkStatus();
  }

 private:
  bool orthogonal_;
  std::vector<std::vector<at::Tensor>> a_, b_;          // [task][module], committed
  std::vector<std::shared_ptr<LoraAdapter>> adapters_;  // active task
  std::vector<at::Tensor> past_a_;                      // o_lora: stacked earlier A per module
};

// ---- seq_ft (and mtl full) ----------------------------------------------------------------------------
// Full fine-tuning: BeginTask puts trainable clones into the working model's parameter slots, so the
// served model is never written; EndTask keeps them (detached) as the new served parameters.
// Committed: every parameter ever trained, by HF name (the served value).
class SeqFtMethod : public Method {
 public:
  SeqFtMethod(const MethodConfig& config, bool joint) : Method(config), joint_(joint) {}
  std::string name() const override { return joint_ ? "mtl" : "seq_ft"; }
  bool joint() const override { return joint_; }

  std::vector<std::pair<std::string, at::Tensor>> TrainableParameters() const override { return active_; }

  absl::Status ApplyServedWeights(CausalLM* base) const override {
    for (const auto& [pname, value] : params_) {
      at::Tensor* slot = base->FindParameter(pname);
      if (slot == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": the model has no parameter \"", pname, "\""));
      }
      if (!slot->sizes().equals(value.sizes())) {
        return absl::InvalidArgumentError(absl::StrCat(name(), ": parameter \"", pname, "\" has shape ",
                                                       ShapeString(*slot), ", the state holds ",
                                                       ShapeString(value)));
      }
    }
    at::NoGradGuard no_grad;
    bool embed = false;
    for (const auto& [pname, value] : params_) {
      at::Tensor* slot = base->FindParameter(pname);
      *slot = value.to(slot->device(), slot->scalar_type());
      embed = embed || pname == "model.embed_tokens.weight";
    }
    if (embed && base->config().tie_word_embeddings) base->RetieEmbeddings();
    return absl::OkStatus();
  }

 protected:
  bool uses_modules() const override { return config_.ft_scope == "target"; }

  absl::Status DoBeginTask(const std::string& task_name, CausalLM* model) override {
    at::NoGradGuard no_grad;
    active_.clear();
    std::vector<std::string> names;
    if (config_.ft_scope == "target") {
      for (const auto& m : modules_) names.push_back(m + ".weight");
    } else {
      for (const auto& [pname, t] : model->NamedParameters()) names.push_back(pname);
    }
    bool embed = false;
    for (const auto& pname : names) {
      at::Tensor* slot = model->FindParameter(pname);
      if (slot == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": the model has no parameter \"", pname, "\""));
      }
      at::Tensor trainable = slot->detach().clone();
      trainable.requires_grad_(true);
      *slot = trainable;
      active_.emplace_back(pname, trainable);
      embed = embed || pname == "model.embed_tokens.weight";
    }
    if (embed && model->config().tie_word_embeddings) model->RetieEmbeddings();
    return absl::OkStatus();
  }

  absl::Status DoEndTask(const std::string& task_name, CausalLM* model) override {
    std::map<std::string, at::Tensor> params = params_;
    for (const auto& [pname, t] : active_) {
      RETURN_IF_ERROR(CheckFinite(name(), "parameter " + pname, t.detach()));
    }
    bool embed = false;
    for (const auto& [pname, t] : active_) {
      at::Tensor* slot = model->FindParameter(pname);
      TORCH_CHECK(slot != nullptr, name(), ": the working model lost parameter ", pname);
      *slot = t.detach();
      params[pname] = *slot;
      embed = embed || pname == "model.embed_tokens.weight";
    }
    if (embed && model->config().tie_word_embeddings) model->RetieEmbeddings();
    params_ = std::move(params);
    active_.clear();
    return absl::OkStatus();
  }

  void DoAbortTask() override { active_.clear(); }

  void ExportTensors(std::map<std::string, at::Tensor>* tensors, std::string* extra) const override {
    for (const auto& [pname, t] : params_) (*tensors)["param/" + pname] = t;
  }

  absl::Status ImportTensors(const std::map<std::string, at::Tensor>& tensors,
                             const std::string& extra) override {
    std::map<std::string, at::Tensor> params;
    for (const auto& [key, t] : tensors) {
      if (key.rfind("param/", 0) != 0) {
        return absl::InvalidArgumentError(absl::StrCat(name(), " state: unexpected tensor \"", key, "\""));
      }
      if (!t.defined() || !at::isFloatingType(t.scalar_type())) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), " state: tensor \"", key, "\" is not floating point"));
      }
      params[key.substr(6)] = t.detach().to(at::kCPU).clone();
    }
    if (!tasks_.empty() && params.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(name(), " state: tasks recorded but no \"param/\" tensors"));
    }
    params_ = std::move(params);
    active_.clear();
    return absl::OkStatus();
  }

 private:
  bool joint_;
  std::map<std::string, at::Tensor> params_;  // committed trained parameters
  std::vector<std::pair<std::string, at::Tensor>> active_;
};

// ---- registration ----------------------------------------------------------------------------------

std::vector<MethodOption> BaselineOptions() {
  return {NumberOption("olora_lambda", &MethodConfig::olora_lambda,
                       "O-LoRA: weight of the orthogonality term", 0),
          ChoiceOption("ft_scope", &MethodConfig::ft_scope,
                       "seq_ft, mtl (full): all (every parameter) or target (the target modules' weights)",
                       {"all", "target"}),
          ChoiceOption("mtl_shape", &MethodConfig::mtl_shape,
                       "mtl: full (full fine-tuning) or lora (one LoRA trained jointly)", {"full", "lora"})};
}

MethodDescriptor WithCapabilities(MethodDescriptor d, bool task_routing, bool joint) {
  d.task_routing = task_routing;
  d.joint = joint;
  return d;
}

const MethodRegistrar kSeqLora(
    MethodDescriptor("seq_lora", 3, "one LoRA carried across all tasks"),
    [](const MethodConfig& c) { return std::unique_ptr<Method>(new SeqLoraMethod(c, false)); },
    BaselineOptions());
const MethodRegistrar kIncLora(
    WithCapabilities(MethodDescriptor("inc_lora", 4, "a new LoRA per task, earlier ones frozen"), true,
                     false),
    [](const MethodConfig& c) { return std::unique_ptr<Method>(new IncLoraMethod(c, false)); },
    BaselineOptions());
const MethodRegistrar kOLora(
    WithCapabilities(MethodDescriptor("o_lora", 5, "inc_lora with an orthogonality penalty",
                                      {"olora_lambda"}),
                     true, false),
    [](const MethodConfig& c) { return std::unique_ptr<Method>(new IncLoraMethod(c, true)); },
    BaselineOptions());
const MethodRegistrar kSeqFt(
    MethodDescriptor("seq_ft", 6, "full fine-tuning in sequence", {"ft_scope"}),
    [](const MethodConfig& c) { return std::unique_ptr<Method>(new SeqFtMethod(c, false)); },
    BaselineOptions());
// mtl: the multi-task upper bound (all tasks' data at once), full or LoRA-shaped.
const MethodRegistrar kMtl(
    WithCapabilities(MethodDescriptor("mtl", 7, "multi-task training on all tasks at once (upper bound)",
                                      {"mtl_shape", "ft_scope"}),
                     false, true),
    [](const MethodConfig& c) {
      return c.mtl_shape == "lora" ? std::unique_ptr<Method>(new SeqLoraMethod(c, true))
                                   : std::unique_ptr<Method>(new SeqFtMethod(c, true));
    },
    BaselineOptions());

}  // namespace
}  // namespace strata
