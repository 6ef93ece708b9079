// share, ella and share_ella (docs ALGORITHMS.md sections 1-3) on ShareModule / EllaModule.
//
// Per target module:
//   share:      ShareModule; task t trains a plain rank-p LoRA (share_training "lora", the default)
//               or ShareTaskFactors (share_training "subspace", the published training); merge =
//               basis update (the LoRA is balanced, then folded in like an imported adapter). Served weights
//               W0 + Σ_i ΔW_i with ΔW_i = s·β Eβ_i (α Eα_i)ᵀ reconstructed from the current subspace
//               (= s·β (Σ_i Eβ_i Eα_iᵀ) αᵀ, one k×k sum and one n×k×d product per module).
//   ella:       task t trains a fresh LoRA (rank, alpha) with λ‖ΔW_t ⊙ Ŵ_past‖²; merge: the served
//               weights become W0 + W_past + ΔW_t (exact).
//   share_ella: both on the same ΔW_t = s·B_t A_t from Share's factors; served W0 + W_past (exact),
//               the subspace gives compact per-task adapters and task routing (the model as of a
//               task, rebuilt from the coefficients of it and every earlier task).
//
// Memory (ella, share_ella): no dense W_past is kept. The served model already holds
// W_served = W0 + W_past for every target module, so the committed state keeps a handle to each
// served weight (the same tensor the served model holds, in its dtype and on its device: no copy)
// and W_past = W_served − W0 is derived where it is needed: only the ELLA penalty with λ > 0 needs
// it, as a dense float32 Ŵ_past built at BeginTask and dropped at EndTask/AbortTask. W0 comes from
// handles to the base weights, recorded at the first task (the working model then holds W0), by
// ApplyServedWeights (its `base` holds W0) and by ImportPeftAdapter. The exported state (and so a
// checkpoint) holds the served weights of the target modules, once, in the model's dtype
// ("served/<module>"): the exact served model survives a restart (Share's reconstruction is
// truncated). States written before this change hold a dense float32 "ella/<module>/w_past"
// (format strata.ella.v1): they still load; W_past is then used as stored until the next task or
// import rewrites the state in the new form.
#include <torch/torch.h>

#include <mutex>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/adapt/ella.h"
#include "core/adapt/lora.h"
#include "core/adapt/method.h"
#include "core/adapt/methods.h"
#include "core/adapt/peft_import.h"
#include "core/adapt/share.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

using json = nlohmann::json;

// extra["served"]["format"]: the state holds the served weights of the target modules.
constexpr char kServedFormat[] = "strata.served_weights.v1";

// Share's trainable factors as a side path: while a forward records gradients the factors are
// rebuilt (B = β Eβ + Rβ1 Rβ2, ...) on every forward so gradients reach the coefficients and
// temporary vectors. Without gradients (evaluation of the pending task, the after-training pass)
// the factors are frozen: the built pair is cached until an optimiser step changes a factor (its
// version counter) and shared by concurrent forwards.
class ShareAdapter : public LowRankAdapter {
 public:
  explicit ShareAdapter(ShareTaskFactors factors)
      : LowRankAdapter(factors.scale), factors_(std::move(factors)) {}
  std::pair<at::Tensor, at::Tensor> Factors() const override {
    if (at::GradMode::is_enabled()) return {factors_.B(), factors_.A()};
    const std::vector<int64_t> versions = Versions();
    std::lock_guard<std::mutex> lock(mu_);
    if (!cached_b_.defined() || versions != cached_versions_) {
      cached_b_ = factors_.B();
      cached_a_ = factors_.A();
      cached_versions_ = versions;
    }
    return {cached_b_, cached_a_};
  }
  const ShareTaskFactors& factors() const { return factors_; }

 private:
  std::vector<int64_t> Versions() const {
    std::vector<int64_t> v;
    for (const at::Tensor* t :
         {&factors_.beta, &factors_.alpha, &factors_.e_beta, &factors_.e_alpha, &factors_.r_beta1,
          &factors_.r_beta2, &factors_.r_alpha1, &factors_.r_alpha2}) {
      v.push_back(t->defined() && !t->is_inference() ? static_cast<int64_t>(t->_version()) : -1);
      v.push_back(t->defined() ? reinterpret_cast<int64_t>(t->data_ptr()) : 0);
    }
    return v;
  }

  ShareTaskFactors factors_;
  mutable std::mutex mu_;
  mutable at::Tensor cached_b_, cached_a_;
  mutable std::vector<int64_t> cached_versions_;
};

// s·β (Σ_i Eβ_i Eα_iᵀ) αᵀ: the sum of every task's reconstructed update [n, d] (float32 CPU).
absl::StatusOr<at::Tensor> ReconstructedSum(const ShareModule& module) {
  at::NoGradGuard no_grad;
  const int64_t kb = module.k_beta();
  const int64_t ka = module.k_alpha();
  if (kb == 0 || ka == 0 || module.num_tasks() == 0) {
    return at::zeros({module.out_features(), module.in_features()}, at::TensorOptions().dtype(at::kFloat));
  }
  at::Tensor c = at::zeros({kb, ka}, at::TensorOptions().dtype(at::kFloat));
  for (const std::string& task : module.TaskNames()) {
    ASSIGN_OR_RETURN(auto coeffs, module.TaskCoefficients(task));
    if (coeffs.first.size(1) == 0) continue;
    c = c.addmm(coeffs.first, coeffs.second.t());
  }
  return module.beta().mm(c).mm(module.alpha().t()).mul(module.scale());
}

class ShareEllaMethod : public Method {
 public:
  ShareEllaMethod(const MethodConfig& config, bool use_share, bool use_ella)
      : Method(config), use_share_(use_share), use_ella_(use_ella) {}

  std::string name() const override {
    return use_share_ && use_ella_ ? "share_ella" : use_share_ ? "share" : "ella";
  }

  std::vector<std::pair<std::string, at::Tensor>> TrainableParameters() const override {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (size_t i = 0; i < share_adapters_.size(); ++i) {
      for (auto& [pname, t] : share_adapters_[i]->factors().NamedParameters()) {
        out.emplace_back(modules_[i] + "." + pname, t);
      }
    }
    for (size_t i = 0; i < lora_adapters_.size(); ++i) {
      out.emplace_back(modules_[i] + ".lora_A", lora_adapters_[i]->a());
      out.emplace_back(modules_[i] + ".lora_B", lora_adapters_[i]->b());
    }
    return out;
  }

  // ELLA: λ Σ_modules ‖ΔW_t ⊙ Ŵ_past‖²_F. Undefined (no cost) while every W_past is zero, i.e. at
  // t = 1.
  at::Tensor ExtraLoss() override {
    if (!use_ella_ || !penalty_active_) return at::Tensor();
    at::Tensor total;
    for (size_t i = 0; i < modules_.size(); ++i) {
      const EllaModule& ella = pending_ella_.at(modules_[i]);
      if (ella.past_rms() == 0.0) continue;
      at::Tensor term = ella.Penalty(PendingDelta(i));
      total = total.defined() ? total.add(term) : term;
    }
    return total;
  }

  // Also records `base`'s target weights as W0 (handles, no copy) for the ELLA penalty.
  absl::Status ApplyServedWeights(CausalLM* base) const override {
    if (tasks_.empty()) return absl::OkStatus();
    RETURN_IF_ERROR(CheckBase(*base));
    at::NoGradGuard no_grad;
    if (use_ella_) BindBase(*base);
    std::vector<at::Tensor> weights;
    for (const auto& m : modules_) {
      const LinearLayer* layer = base->FindLinear(m);
      if (use_ella_ && !legacy_.empty()) {
        ASSIGN_OR_RETURN(at::Tensor w, legacy_.at(m).ServedWeight(layer->weight));
        weights.push_back(w);
      } else if (use_ella_) {
        // The stored served weight itself when dtype and device match (shared, not copied).
        weights.push_back(served_.at(m).to(layer->weight.device(), layer->weight.scalar_type()));
      } else {
        ASSIGN_OR_RETURN(at::Tensor sum, ReconstructedSum(share_.at(m)));
        weights.push_back(
            layer->weight.to(at::kFloat).add(sum.to(layer->weight.device())).to(layer->weight.scalar_type()));
      }
    }
    for (size_t i = 0; i < modules_.size(); ++i) base->FindLinear(modules_[i])->weight = weights[i];
    return absl::OkStatus();
  }

  bool SupportsTaskRouting() const override { return use_share_; }
  absl::Status ApplyTaskRouting(const std::string& task, CausalLM* base) const override {
    if (!use_share_) return Method::ApplyTaskRouting(task, base);
    if (std::find(tasks_.begin(), tasks_.end(), task) == tasks_.end()) {
      return absl::NotFoundError(absl::StrCat(name(), ": unknown task \"", task, "\""));
    }
    RETURN_IF_ERROR(CheckBase(*base));
    // Through the shared basis (on CPU the module's own β and α: every task's route shares them).
    std::vector<std::shared_ptr<LinearAdapter>> adapters;
    for (const auto& m : modules_) {
      const ShareModule& share = share_.at(m);
      ASSIGN_OR_RETURN(ShareModule::Core c, share.CumulativeCore(task));
      const at::Device dev = base->FindLinear(m)->weight.device();
      adapters.push_back(std::make_shared<SharedBasisAdapter>(c.beta.to(dev), c.core.to(dev), c.alpha.to(dev),
                                                              share.scale()));
    }
    for (size_t i = 0; i < modules_.size(); ++i) base->FindLinear(modules_[i])->adapter = adapters[i];
    return absl::OkStatus();
  }

  absl::Status ImportPeftAdapter(const std::string& task, const PeftLoraAdapter& adapter,
                                 const CausalLM& base) override {
    if (!use_share_) return Method::ImportPeftAdapter(task, adapter, base);
    if (task_active()) {
      return absl::FailedPreconditionError(
          absl::StrCat(name(), ": cannot import while task \"", active_task(), "\" is training"));
    }
    if (std::find(tasks_.begin(), tasks_.end(), task) != tasks_.end()) {
      return absl::AlreadyExistsError(absl::StrCat(name(), ": task \"", task, "\" already exists"));
    }
    std::vector<std::string> modules = modules_;
    std::vector<std::pair<int64_t, int64_t>> shapes = module_shapes_;
    if (modules.empty()) {
      ASSIGN_OR_RETURN(modules, ResolveTargetModules(base, config_.target_modules));
      for (const auto& m : modules) {
        const LinearLayer* layer = base.FindLinear(m);
        shapes.emplace_back(layer->weight.size(0), layer->weight.size(1));
      }
    }
    for (const auto& [m, module] : adapter.modules) {
      if (std::find(modules.begin(), modules.end(), m) == modules.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": adapter module \"", m, "\" is not a target module of this state (",
                         modules.size(), " targets, e.g. \"", modules.front(), "\")"));
      }
    }
    at::NoGradGuard no_grad;
    std::map<std::string, ShareModule> share = share_;
    for (size_t i = 0; i < modules.size(); ++i) {
      if (!share.count(modules[i])) {
        ASSIGN_OR_RETURN(ShareModule m,
                         ShareModule::Create(shapes[i].first, shapes[i].second, MakeShareOptions()));
        share.emplace(modules[i], std::move(m));
      }
    }
    RETURN_IF_ERROR(MergePeftIntoShare(adapter, task, MakeShareOptions(), &share));
    std::map<std::string, at::Tensor> served;
    if (use_ella_) {
      // The new served weights: the current ones (W0 when nothing is merged yet) + the adapter's ΔW.
      for (const auto& m : modules) {
        const LinearLayer* layer = base.FindLinear(m);
        if (layer == nullptr) {
          return absl::InvalidArgumentError(
              absl::StrCat(name(), ": the model has no linear layer \"", m, "\""));
        }
        at::Tensor current;
        if (served_.count(m)) {
          current = served_.at(m);
        } else if (legacy_.count(m)) {
          ASSIGN_OR_RETURN(current, legacy_.at(m).ServedWeight(layer->weight));
        } else {
          current = layer->weight;
        }
        auto it = adapter.modules.find(m);
        if (it == adapter.modules.end()) {
          served[m] = current;
          continue;
        }
        const at::Tensor delta = it->second.Delta().to(current.device(), at::kFloat);
        if (!at::isfinite(delta).all().item<bool>()) {
          return absl::InvalidArgumentError(absl::StrCat(name(), ": adapter module \"", m, "\" of task \"",
                                                         task, "\" has non-finite values"));
        }
        served[m] = current.to(at::kFloat).add(delta).to(current.scalar_type());
      }
      BindBase(base);
    }
    share_ = std::move(share);
    served_ = std::move(served);
    legacy_.clear();
    modules_ = std::move(modules);
    module_shapes_ = std::move(shapes);
    tasks_.push_back(task);
    return absl::OkStatus();
  }

  // For tests and tools: the committed per-module state.
  const std::map<std::string, ShareModule>& share_modules() const { return share_; }
  // ella, share_ella: the served weight of each target module (shared with the served model).
  const std::map<std::string, at::Tensor>& served_weights() const { return served_; }

 protected:
  ShareOptions MakeShareOptions() const {
    ShareOptions o;
    o.k_max = config_.k_max;
    o.p = config_.p;
    o.phi = config_.phi;
    o.lora_alpha = config_.alpha;
    o.energy_threshold = config_.energy_threshold;
    return o;
  }
  EllaOptions MakeEllaOptions() const {
    EllaOptions o;
    o.lambda = config_.ella_lambda;
    return o;
  }

  absl::Status CheckBase(const CausalLM& base) const {
    for (size_t i = 0; i < modules_.size(); ++i) {
      const LinearLayer* layer = base.FindLinear(modules_[i]);
      if (layer == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), ": the model has no linear layer \"", modules_[i], "\""));
      }
      if (layer->weight.size(0) != module_shapes_[i].first ||
          layer->weight.size(1) != module_shapes_[i].second) {
        return absl::InvalidArgumentError(absl::StrCat(name(), ": module \"", modules_[i],
                                                       "\" does not have the shape of the method state"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status DoBeginTask(const std::string& task_name, CausalLM* model) override {
    at::NoGradGuard no_grad;
    share_adapters_.clear();
    lora_adapters_.clear();
    // Modules are created lazily at the first task (their sizes come from the model).
    std::map<std::string, ShareModule> share = share_;
    for (size_t i = 0; i < modules_.size(); ++i) {
      const auto [n, d] = module_shapes_[i];
      if (use_share_ && !share.count(modules_[i])) {
        ASSIGN_OR_RETURN(ShareModule m, ShareModule::Create(n, d, MakeShareOptions()));
        share.emplace(modules_[i], std::move(m));
      }
    }
    // Before the first merge the working model holds W0: remember it.
    if (use_ella_ && tasks_.empty()) BindBase(*model);
    // The ELLA penalty's Ŵ_past, float32, for this task only: W_served − W0 (or a v1 state's W_past).
    std::map<std::string, EllaModule> ella;
    penalty_active_ = false;
    if (use_ella_ && config_.ella_lambda > 0.0 && !tasks_.empty()) {
      for (size_t i = 0; i < modules_.size(); ++i) {
        const std::string& m = modules_[i];
        at::Tensor past;
        if (legacy_.count(m)) {
          past = legacy_.at(m).w_past();
        } else {
          const at::Tensor w0 = BaseWeight(m);
          if (!w0.defined()) {
            return absl::FailedPreconditionError(absl::StrCat(
                name(), ": the ELLA penalty (lambda ", config_.ella_lambda,
                " > 0) derives W_past = W_served - W0 and needs the base weights W0 of module \"", m,
                "\": call ApplyServedWeights(base) after importing a state"));
          }
          const LinearLayer* layer = model->FindLinear(m);
          TORCH_CHECK(layer != nullptr, name(), ": the model has no linear layer ", m);
          past = layer->weight.to(at::kFloat).sub(w0.to(layer->weight.device(), at::kFloat));
        }
        ASSIGN_OR_RETURN(EllaModule e, EllaModule::FromPast(past, MakeEllaOptions(), num_tasks()));
        if (e.past_rms() > 0.0) penalty_active_ = true;
        ella.emplace(m, std::move(e));
      }
    }
    for (size_t i = 0; i < modules_.size(); ++i) {
      LinearLayer* layer = model->FindLinear(modules_[i]);
      TORCH_CHECK(layer != nullptr, name(), ": the model has no linear layer ", modules_[i]);
      const at::Device dev = layer->weight.device();
      const uint64_t seed = lora_training()
                                ? TaskLoraSeed(config_.seed, modules_[i], task_name)
                                : DeriveSeed(config_.seed, modules_[i], absl::StrCat(name(), "/", task_name));
      if (!lora_training()) {
        auto adapter = std::make_shared<ShareAdapter>(share.at(modules_[i]).BeginTask(seed, dev));
        layer->adapter = adapter;
        share_adapters_.push_back(std::move(adapter));
      } else {
        // Share folds a rank-p LoRA (scale alpha / p, as the subspace's); ELLA trains rank r.
        const int64_t rank = use_share_ ? config_.p : config_.rank;
        auto adapter = LoraAdapter::Create(d_of(i), n_of(i), rank, config_.alpha, seed, at::kFloat, dev);
        adapter->SetTrainable(true);
        layer->adapter = adapter;
        lora_adapters_.push_back(std::move(adapter));
      }
    }
    // Fresh modules (first task) are part of the committed state only after EndTask; keep them
    // pending here.
    pending_share_ = std::move(share);
    pending_ella_ = std::move(ella);
    return absl::OkStatus();
  }

  absl::Status DoEndTask(const std::string& task_name, CausalLM* model) override {
    std::map<std::string, ShareModule> share = pending_share_;
    std::vector<at::Tensor> weight_updates(modules_.size());
    for (size_t i = 0; i < modules_.size(); ++i) {
      const std::string& m = modules_[i];
      // ELLA checks ΔW_t here on its device and recomputes it module by module at install time
      // below, so no dense copy of every module's update is held at once.
      at::Tensor delta =
          use_ella_ ? PendingDelta(i).detach() : PendingDelta(i).detach().to(at::kCPU, at::kFloat);
      if (!at::isfinite(delta).all().item<bool>()) {
        return absl::InvalidArgumentError(absl::StrCat(
            name(), ": the update of module \"", m, "\" for task \"", task_name, "\" has non-finite values"));
      }
      at::Tensor old_sum;
      if (use_share_ && !use_ella_) {
        ASSIGN_OR_RETURN(old_sum, ReconstructedSum(share.at(m)));
      }
      if (use_share_ && lora_training()) {
        // Fold: the trained LoRA, balanced (both sides carry √σ of ΔW), merged like an import.
        const LoraAdapter& lora = *lora_adapters_[i];
        auto [b, a] = BalanceLowRankFactors(lora.b(), lora.a());
        RETURN_IF_ERROR(share.at(m).MergeLora(task_name, b, a, lora.scaling()));
      } else if (use_share_) {
        RETURN_IF_ERROR(share.at(m).Merge(task_name, share_adapters_[i]->factors()));
      }
      delta = at::Tensor();
      if (!use_ella_) {
        ASSIGN_OR_RETURN(at::Tensor new_sum, ReconstructedSum(share.at(m)));
        weight_updates[i] = new_sum.sub(old_sum);
      }
    }
    std::map<std::string, at::Tensor> served;
    for (size_t i = 0; i < modules_.size(); ++i) {
      LinearLayer* layer = model->FindLinear(modules_[i]);
      TORCH_CHECK(layer != nullptr, name(), ": the working model lost ", modules_[i]);
      // ELLA: W0 + W_past + ΔW_t, the exact update (float32 ΔW_t added in the weight's dtype).
      const at::Tensor update = use_ella_ ? PendingDelta(i).detach() : weight_updates[i];
      layer->adapter.reset();
      AddToWeight(layer, update);
      weight_updates[i] = at::Tensor();
      if (use_ella_) served[modules_[i]] = layer->weight;
    }
    share_ = std::move(share);
    served_ = std::move(served);
    legacy_.clear();
    DoAbortTask();
    return absl::OkStatus();
  }

  void DoAbortTask() override {
    share_adapters_.clear();
    lora_adapters_.clear();
    pending_share_.clear();
    pending_ella_.clear();
    penalty_active_ = false;
  }

  void ExportTensors(std::map<std::string, at::Tensor>* tensors, std::string* extra) const override {
    json j = json::object();
    json share = json::object();
    json ella = json::object();
    for (const auto& [m, module] : share_) {
      module.ExportState("share/" + m + "/", tensors);
      share[m] = module.ConfigJson();
    }
    // A v1 state not yet rewritten by a task keeps its form (its W0 may not be known here).
    for (const auto& [m, module] : legacy_) {
      module.ExportState("ella/" + m + "/", tensors);
      ella[m] = module.ConfigJson();
    }
    for (const auto& [m, w] : served_) (*tensors)["served/" + m] = w;
    j["share"] = share;
    j["ella"] = ella;
    if (use_ella_ && legacy_.empty() && !tasks_.empty()) {
      j["served"] = {{"format", kServedFormat},
                     {"dtype", std::string(c10::toString(served_.begin()->second.scalar_type()))}};
    }
    *extra = j.dump();
  }

  absl::Status ImportTensors(const std::map<std::string, at::Tensor>& tensors,
                             const std::string& extra) override {
    json j = json::parse(extra, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return absl::InvalidArgumentError(name() + " state: bad \"extra\"");
    std::map<std::string, ShareModule> share;
    std::map<std::string, EllaModule> legacy;
    std::map<std::string, at::Tensor> served;
    const bool has_served = j.contains("served");
    if (use_ella_ && has_served) {
      const json& sj = j["served"];
      if (!sj.is_object() || !sj.contains("format") || !sj["format"].is_string() ||
          sj["format"].get<std::string>() != kServedFormat) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), " state: \"served\" must name format \"", kServedFormat, "\""));
      }
    }
    auto config_of = [&](const char* kind, const std::string& m) -> absl::StatusOr<std::string> {
      if (!j.contains(kind) || !j[kind].is_object() || !j[kind].contains(m) || !j[kind][m].is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(name(), " state: no ", kind, " config for module \"", m, "\""));
      }
      return j[kind][m].get<std::string>();
    };
    if (!tasks_.empty()) {
      for (size_t i = 0; i < modules_.size(); ++i) {
        const std::string& m = modules_[i];
        if (use_share_) {
          ASSIGN_OR_RETURN(std::string cfg, config_of("share", m));
          ASSIGN_OR_RETURN(ShareModule module, ShareModule::ImportState(cfg, "share/" + m + "/", tensors));
          if (module.out_features() != n_of(i) || module.in_features() != d_of(i) ||
              module.TaskNames() != tasks_) {
            return absl::InvalidArgumentError(absl::StrCat(
                name(), " state: Share module \"", m, "\" does not match the method's shapes or task list"));
          }
          share.emplace(m, std::move(module));
        }
        if (use_ella_ && has_served) {
          // Served weights: kept as stored (the model's dtype), not copied. Finite at their merge;
          // a checkpoint's files are checked against their SHA-256.
          auto it = tensors.find("served/" + m);
          if (it == tensors.end() || !it->second.defined()) {
            return absl::InvalidArgumentError(
                absl::StrCat(name(), " state: missing tensor \"served/", m, "\""));
          }
          const at::Tensor& w = it->second;
          if (w.dim() != 2 || w.size(0) != n_of(i) || w.size(1) != d_of(i) ||
              !at::isFloatingType(w.scalar_type())) {
            return absl::InvalidArgumentError(
                absl::StrCat(name(), " state: tensor \"served/", m, "\" has shape ", ShapeString(w),
                             ", expected floating [", n_of(i), ", ", d_of(i), "]"));
          }
          served.emplace(m, w.detach());
        } else if (use_ella_) {
          // strata.ella.v1: a dense float32 W_past per module.
          ASSIGN_OR_RETURN(std::string cfg, config_of("ella", m));
          ASSIGN_OR_RETURN(EllaModule module, EllaModule::ImportState(cfg, "ella/" + m + "/", tensors));
          if (module.out_features() != n_of(i) || module.in_features() != d_of(i)) {
            return absl::InvalidArgumentError(
                absl::StrCat(name(), " state: ELLA module \"", m, "\" does not match the method's shapes"));
          }
          legacy.emplace(m, std::move(module));
        }
      }
    }
    share_ = std::move(share);
    served_ = std::move(served);
    legacy_ = std::move(legacy);
    DoAbortTask();
    return absl::OkStatus();
  }

 private:
  // Records the target weights of `model` (which holds W0) as the base weights; modules whose
  // shape differs from the state are skipped (CheckBase refuses such a model elsewhere).
  void BindBase(const CausalLM& model) const {
    std::lock_guard<std::mutex> lock(base_mu_);
    for (size_t i = 0; i < modules_.size(); ++i) {
      const LinearLayer* layer = model.FindLinear(modules_[i]);
      if (layer == nullptr || layer->weight.size(0) != n_of(i) || layer->weight.size(1) != d_of(i)) continue;
      base_[modules_[i]] = layer->weight;
    }
  }
  // W0 of module `m`; undefined when no base was bound.
  at::Tensor BaseWeight(const std::string& m) const {
    std::lock_guard<std::mutex> lock(base_mu_);
    auto it = base_.find(m);
    return it == base_.end() ? at::Tensor() : it->second;
  }

  int64_t n_of(size_t i) const { return module_shapes_[i].first; }
  // Whether the active task trains a plain LoRA (ella always; share/share_ella unless
  // share_training is "subspace").
  bool lora_training() const { return !use_share_ || config_.share_training == "lora"; }
  // The pending task's ΔW_t = s·B_t A_t of module i (differentiable).
  at::Tensor PendingDelta(size_t i) const {
    return lora_training() ? lora_adapters_[i]->DeltaWeight() : share_adapters_[i]->DeltaWeight();
  }
  int64_t d_of(size_t i) const { return module_shapes_[i].second; }

  bool use_share_;
  bool use_ella_;
  // Committed, by module name.
  std::map<std::string, ShareModule> share_;
  // ella, share_ella: the served weight of each target module (W0 + W_past; the tensor the served
  // model holds, in its dtype).
  std::map<std::string, at::Tensor> served_;
  // A strata.ella.v1 state's dense W_past, until the next task or import rewrites the state.
  std::map<std::string, EllaModule> legacy_;
  // W0 handles (shared with the base model; not part of the state). Written by const
  // ApplyServedWeights, hence mutable and locked.
  mutable std::mutex base_mu_;
  mutable std::map<std::string, at::Tensor> base_;
  // Active task.
  std::map<std::string, ShareModule> pending_share_;
  // The ELLA penalty's dense Ŵ_past (λ > 0, t > 1), for the active task only.
  std::map<std::string, EllaModule> pending_ella_;
  std::vector<std::shared_ptr<ShareAdapter>> share_adapters_;
  std::vector<std::shared_ptr<LoraAdapter>> lora_adapters_;
  bool penalty_active_ = false;
};

// ---- registration ----------------------------------------------------------------------------------

std::vector<MethodOption> ShareEllaOptions() {
  MethodOption p = IntegerOption("p", &MethodConfig::p, "Share: pseudo-rank per task (follows --rank)", 1);
  p.flag = "-";
  MethodOption lambda = NumberOption("ella_lambda", &MethodConfig::ella_lambda,
                                     "ELLA: penalty weight (per task: strata submit --lambda)", 0);
  lambda.per_task = true;
  lambda.aliases = {"lambda"};
  return {IntegerOption("k_max", &MethodConfig::k_max, "Share: cap on the subspace rank per side", 1),
          IntegerOption(
              "phi", &MethodConfig::phi,
              "Share: temporary basis vectors per side while a task trains (share_training=subspace)", 1),
          p,
          NumberOption("energy_threshold", &MethodConfig::energy_threshold,
                       "Share: explained-energy fraction a merge keeps", 0, 1, /*min_exclusive=*/true),
          ChoiceOption(
              "share_training", &MethodConfig::share_training,
              "Share: how a task trains before its merge into the subspace: lora (a rank-p LoRA folded in "
              "at the end of the task) or subspace (the published coefficients + temporary vectors)",
              {"lora", "subspace"}),
          lambda};
}

MethodDescriptor Descriptor(const char* name, int order, bool use_share, bool use_ella) {
  MethodDescriptor d(name, order, "");
  d.task_routing = use_share;
  d.adapter_import = use_share;
  if (use_share) d.options = {"k_max", "phi", "p", "energy_threshold", "share_training"};
  if (use_ella) d.options.push_back("ella_lambda");
  d.summary = use_share && use_ella ? "Share subspace per layer + ELLA aggregate (the default)"
              : use_share           ? "Share: one evolving low-rank subspace per layer"
                                    : "ELLA: one aggregated update per layer with a penalty on the past";
  return d;
}

MethodFactory Factory(bool use_share, bool use_ella) {
  return [use_share, use_ella](const MethodConfig& config) {
    return std::unique_ptr<Method>(new ShareEllaMethod(config, use_share, use_ella));
  };
}

const MethodRegistrar kShareElla(Descriptor("share_ella", 0, true, true), Factory(true, true),
                                 ShareEllaOptions());
const MethodRegistrar kShare(Descriptor("share", 1, true, false), Factory(true, false), ShareEllaOptions());
const MethodRegistrar kElla(Descriptor("ella", 2, false, true), Factory(false, true), ShareEllaOptions());

}  // namespace
}  // namespace strata
