#include "core/adapt/method.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

using json = nlohmann::json;
constexpr char kStateFormat[] = "strata.method.v1";
const char* const kShortLinearNames[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                         "gate_proj", "up_proj", "down_proj"};

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

absl::StatusOr<std::vector<std::string>> StringList(const json& j, const char* field) {
  auto it = j.find(field);
  if (it == j.end() || !it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("method state: field \"", field, "\" missing or not a list"));
  }
  std::vector<std::string> out;
  for (const json& e : *it) {
    if (!e.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat("method state: field \"", field, "\" must hold strings"));
    }
    out.push_back(e.get<std::string>());
  }
  return out;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ResolveTargetModules(const CausalLM& model,
                                                              const std::vector<std::string>& targets) {
  const std::vector<std::string> names = model.LinearNames();
  std::set<std::string> selected;
  for (const std::string& target : targets) {
    bool matched = false;
    for (const std::string& name : names) {
      if (target == "all-linear" || name == target || EndsWith(name, "." + target)) {
        selected.insert(name);
        matched = true;
      }
    }
    if (!matched) {
      return absl::InvalidArgumentError(absl::StrCat(
          "target module \"", target, "\" matches no linear layer of the model; valid: all-linear, ",
          absl::StrJoin(std::begin(kShortLinearNames), std::end(kShortLinearNames), ", "),
          " or a full name such as \"", names.empty() ? std::string("?") : names.front(), "\""));
    }
  }
  std::vector<std::string> out;
  for (const std::string& name : names) {
    if (selected.count(name)) out.push_back(name);
  }
  return out;
}

// ---- Method ------------------------------------------------------------------------------------

absl::Status Method::SetTaskConfig(const MethodConfig& config) {
  if (active_) {
    return absl::FailedPreconditionError(
        absl::StrCat("task '", active_task_, "' is active: hyper-parameters change only between tasks"));
  }
  for (const MethodOption& o : AllMethodOptions()) {
    if (o.per_task || MethodOptionText(config, o) == MethodOptionText(config_, o)) continue;
    return absl::InvalidArgumentError(absl::StrCat(name(), ": ", o.name, " is fixed by the state (",
                                                   MethodOptionText(config_, o), "), got ",
                                                   MethodOptionText(config, o)));
  }
  RETURN_IF_ERROR(ValidateMethodConfig(config));
  config_ = config;
  return absl::OkStatus();
}

absl::Status Method::BeginTask(const std::string& task_name, CausalLM* model) {
  if (active_) {
    return absl::FailedPreconditionError(
        absl::StrCat(name(), ": task \"", active_task_, "\" is still active; end or abort it first"));
  }
  if (model == nullptr) return absl::InvalidArgumentError(absl::StrCat(name(), ": BeginTask needs a model"));
  if (task_name.empty()) return absl::InvalidArgumentError(absl::StrCat(name(), ": the task name is empty"));
  if (std::find(tasks_.begin(), tasks_.end(), task_name) != tasks_.end()) {
    return absl::AlreadyExistsError(absl::StrCat(name(), ": task \"", task_name, "\" was already merged"));
  }
  const std::vector<std::string> old_modules = modules_;
  const auto old_shapes = module_shapes_;
  if (uses_modules()) {
    ASSIGN_OR_RETURN(std::vector<std::string> resolved, ResolveTargetModules(*model, config_.target_modules));
    std::vector<std::pair<int64_t, int64_t>> shapes;
    for (const auto& m : resolved) {
      const LinearLayer* layer = model->FindLinear(m);
      shapes.emplace_back(layer->weight.size(0), layer->weight.size(1));
    }
    if (modules_.empty()) {
      modules_ = resolved;
      module_shapes_ = shapes;
    } else if (resolved != modules_ || shapes != module_shapes_) {
      for (size_t i = 0; i < modules_.size(); ++i) {
        const LinearLayer* layer = model->FindLinear(modules_[i]);
        if (layer == nullptr) {
          return absl::InvalidArgumentError(absl::StrCat(name(), ": the model has no linear layer \"",
                                                         modules_[i], "\" of the method state"));
        }
        if (layer->weight.size(0) != module_shapes_[i].first ||
            layer->weight.size(1) != module_shapes_[i].second) {
          return absl::InvalidArgumentError(
              absl::StrCat(name(), ": module \"", modules_[i], "\" has weight ", ShapeString(layer->weight),
                           " but the method state was built for [", module_shapes_[i].first, ", ",
                           module_shapes_[i].second, "]"));
        }
      }
      return absl::InvalidArgumentError(absl::StrCat(
          name(), ": the target modules resolve to ", resolved.size(), " layers but the method state holds ",
          modules_.size(), " (", absl::StrJoin(modules_, ", "), ")"));
    }
  }
  absl::Status status;
  try {
    status = DoBeginTask(task_name, model);
  } catch (const std::exception& e) {
    status =
        absl::InternalError(absl::StrCat(name(), ": starting task \"", task_name, "\" failed: ", e.what()));
  }
  if (!status.ok()) {
    try {
      DoAbortTask();
    } catch (...) {
    }
    model->ClearAdapters();
    modules_ = old_modules;
    module_shapes_ = old_shapes;
    return status;
  }
  active_ = true;
  active_task_ = task_name;
  return absl::OkStatus();
}

absl::Status Method::EndTask(CausalLM* model) {
  if (!active_)
    return absl::FailedPreconditionError(absl::StrCat(name(), ": EndTask without an active task"));
  if (model == nullptr)
    return absl::InvalidArgumentError(absl::StrCat(name(), ": EndTask needs the working model"));
  absl::Status status;
  try {
    at::NoGradGuard no_grad;
    status = DoEndTask(active_task_, model);
  } catch (const std::exception& e) {
    status =
        absl::InternalError(absl::StrCat(name(), ": merging task \"", active_task_, "\" failed: ", e.what()));
  }
  if (!status.ok()) {
    AbortTask(model);
    return status;
  }
  model->ClearAdapters();
  tasks_.push_back(active_task_);
  active_ = false;
  active_task_.clear();
  return absl::OkStatus();
}

void Method::AbortTask(CausalLM* model) {
  if (!active_) return;
  try {
    DoAbortTask();
  } catch (...) {
  }
  if (model != nullptr) model->ClearAdapters();
  if (tasks_.empty() && uses_modules()) {
    // The first task resolved the modules; an aborted first task leaves no trace.
    modules_.clear();
    module_shapes_.clear();
  }
  active_ = false;
  active_task_.clear();
}

absl::Status Method::ApplyTaskRouting(const std::string& task, CausalLM* base) const {
  std::vector<std::string> routing;
  for (const MethodDescriptor& m : MethodDescriptors()) {
    if (m.task_routing) routing.push_back(m.name);
  }
  return absl::UnimplementedError(absl::StrCat(
      "method ", name(), " has no task-routed weights (supported by: ", absl::StrJoin(routing, ", "), ")"));
}

absl::StatusOr<MethodState> Method::ExportState() const {
  if (active_) {
    return absl::FailedPreconditionError(
        absl::StrCat(name(), ": cannot export the state while task \"", active_task_, "\" is active"));
  }
  MethodState state;
  state.method = name();
  std::string extra = "{}";
  try {
    at::NoGradGuard no_grad;
    ExportTensors(&state.tensors, &extra);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(name(), ": exporting the state failed: ", e.what()));
  }
  for (auto& [key, t] : state.tensors) {
    if (!t.defined())
      return absl::InternalError(absl::StrCat(name(), ": state tensor \"", key, "\" is undefined"));
    t = t.detach().to(at::kCPU).contiguous();
  }
  json j;
  j["format"] = kStateFormat;
  j["method"] = name();
  j["config"] = json::parse(MethodConfigToJson(config_));
  j["tasks"] = tasks_;
  j["modules"] = modules_;
  json shapes = json::array();
  for (const auto& [n, d] : module_shapes_) shapes.push_back({n, d});
  j["module_shapes"] = shapes;
  json extra_json = json::parse(extra, nullptr, false);
  if (extra_json.is_discarded() || !extra_json.is_object()) {
    return absl::InternalError(absl::StrCat(name(), ": method-specific state is not a JSON object"));
  }
  j["extra"] = extra_json;
  state.config_json = j.dump();
  return state;
}

absl::Status Method::ImportState(const MethodState& state) {
  if (active_) {
    return absl::FailedPreconditionError(
        absl::StrCat(name(), ": cannot import a state while task \"", active_task_, "\" is active"));
  }
  if (!state.method.empty() && state.method != name()) {
    return absl::InvalidArgumentError(
        absl::StrCat("method state is for \"", state.method, "\", not \"", name(), "\""));
  }
  json j = json::parse(state.config_json, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError("method state: config is not a JSON object");
  if (!j.contains("format") || !j["format"].is_string() || j["format"].get<std::string>() != kStateFormat) {
    return absl::InvalidArgumentError(
        absl::StrCat("method state: field \"format\" must be \"", kStateFormat, "\""));
  }
  if (!j.contains("method") || !j["method"].is_string() || j["method"].get<std::string>() != name()) {
    return absl::InvalidArgumentError(
        absl::StrCat("method state: field \"method\" must be \"", name(), "\""));
  }
  if (!j.contains("config")) return absl::InvalidArgumentError("method state: field \"config\" missing");
  ASSIGN_OR_RETURN(MethodConfig config, MethodConfigFromJson(j["config"].dump(), "method state config"));
  RETURN_IF_ERROR(ValidateMethodConfig(config));
  ASSIGN_OR_RETURN(std::vector<std::string> tasks, StringList(j, "tasks"));
  ASSIGN_OR_RETURN(std::vector<std::string> modules, StringList(j, "modules"));
  std::vector<std::pair<int64_t, int64_t>> shapes;
  if (!j.contains("module_shapes") || !j["module_shapes"].is_array() ||
      j["module_shapes"].size() != modules.size()) {
    return absl::InvalidArgumentError(
        "method state: field \"module_shapes\" missing or not one [out, in] per module");
  }
  for (const json& s : j["module_shapes"]) {
    if (!s.is_array() || s.size() != 2 || !s[0].is_number_integer() || !s[1].is_number_integer() ||
        s[0].get<int64_t>() < 1 || s[1].get<int64_t>() < 1) {
      return absl::InvalidArgumentError(
          "method state: \"module_shapes\" entries must be [out, in] positive integers");
    }
    shapes.emplace_back(s[0].get<int64_t>(), s[1].get<int64_t>());
  }
  std::string extra = "{}";
  if (j.contains("extra")) {
    if (!j["extra"].is_object())
      return absl::InvalidArgumentError("method state: field \"extra\" must be an object");
    extra = j["extra"].dump();
  }
  MethodConfig old_config = config_;
  std::vector<std::string> old_tasks = tasks_, old_modules = modules_;
  auto old_shapes = module_shapes_;
  config_ = config;
  tasks_ = tasks;
  modules_ = modules;
  module_shapes_ = shapes;
  absl::Status status;
  try {
    at::NoGradGuard no_grad;
    status = ImportTensors(state.tensors, extra);
  } catch (const std::exception& e) {
    status = absl::InvalidArgumentError(absl::StrCat(name(), ": importing the state failed: ", e.what()));
  }
  if (!status.ok()) {
    config_ = old_config;
    tasks_ = old_tasks;
    modules_ = old_modules;
    module_shapes_ = old_shapes;
  }
  return status;
}

// ---- factory -----------------------------------------------------------------------------------

namespace {

std::map<std::string, MethodFactory>& Factories() {
  static auto* factories = new std::map<std::string, MethodFactory>();
  return *factories;
}

}  // namespace

MethodRegistrar::MethodRegistrar(const MethodDescriptor& method, MethodFactory factory,
                                 const std::vector<MethodOption>& options) {
  RegisterMethodOptions(options);
  RegisterMethodDescriptor(method);
  Factories()[method.name] = std::move(factory);
}

absl::StatusOr<std::unique_ptr<Method>> CreateMethod(const std::string& name, const MethodConfig& config) {
  RETURN_IF_ERROR(CheckMethodName(name));
  RETURN_IF_ERROR(ValidateMethodConfig(config));
  std::unique_ptr<Method> method = Factories().at(name)(config);
  if (method == nullptr)
    return absl::InternalError(absl::StrCat("method ", name, ": the factory returned nothing"));
  return method;
}

absl::StatusOr<std::unique_ptr<Method>> CreateMethodFromState(const MethodState& state) {
  json j = json::parse(state.config_json, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("config")) {
    return absl::InvalidArgumentError("method state: config is not a JSON object with a \"config\" field");
  }
  std::string method = state.method;
  if (method.empty() && j.contains("method") && j["method"].is_string())
    method = j["method"].get<std::string>();
  ASSIGN_OR_RETURN(MethodConfig config, MethodConfigFromJson(j["config"].dump(), "method state config"));
  ASSIGN_OR_RETURN(std::unique_ptr<Method> m, CreateMethod(method, config));
  RETURN_IF_ERROR(m->ImportState(state));
  return m;
}

std::string ShapeString(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) absl::StrAppend(&s, i ? ", " : "", t.size(i));
  return s + "]";
}

void AddToWeight(LinearLayer* layer, const at::Tensor& delta) {
  at::NoGradGuard no_grad;
  const at::Tensor w = layer->weight;
  at::Tensor d = delta.detach().to(w.device());
  if (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble) {
    layer->weight = w.add(d.to(w.scalar_type()));
  } else {
    layer->weight = w.to(at::kFloat).add(d.to(at::kFloat)).to(w.scalar_type());
  }
}

absl::Status AdapterImportUnsupported(const std::string& method) {
  std::vector<std::string> importing;
  for (const MethodDescriptor& m : MethodDescriptors()) {
    if (m.adapter_import) importing.push_back(m.name);
  }
  return absl::UnimplementedError(
      absl::StrCat("method ", method, " cannot import LoRA adapters (it keeps no shared subspace); use ",
                   absl::StrJoin(importing, " or ")));
}

absl::Status Method::ImportPeftAdapter(const std::string& task, const PeftLoraAdapter& adapter,
                                       const CausalLM& base) {
  return AdapterImportUnsupported(name());
}

}  // namespace strata
