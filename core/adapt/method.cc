#include "core/adapt/method.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/adapt/methods.h"
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


json ConfigToJsonValue(const MethodConfig& c) {
  json j;
  j["target_modules"] = c.target_modules;
  j["rank"] = c.rank;
  j["alpha"] = c.alpha;
  j["ella_lambda"] = c.ella_lambda;
  j["olora_lambda"] = c.olora_lambda;
  j["k_max"] = c.k_max;
  j["phi"] = c.phi;
  j["p"] = c.p;
  j["energy_threshold"] = c.energy_threshold;
  j["share_training"] = c.share_training;
  j["ft_scope"] = c.ft_scope;
  j["mtl_shape"] = c.mtl_shape;
  j["seed"] = c.seed;
  j["osft_urr"] = c.osft_urr;
  j["osft_rank"] = c.osft_rank;
  j["pm_epsilon"] = c.pm_epsilon;
  return j;
}

absl::StatusOr<MethodConfig> ConfigFromJsonValue(const json& j, const std::string& source) {
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(source, ": method config must be a JSON object"));
  MethodConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    auto bad = [&](const char* want) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": field \"", key, "\" must be ", want));
    };
    if (key == "target_modules") {
      if (v.is_string()) {
        c.target_modules = {v.get<std::string>()};
        continue;
      }
      if (!v.is_array()) return bad("a string or a list of strings");
      c.target_modules.clear();
      for (const json& e : v) {
        if (!e.is_string()) return bad("a string or a list of strings");
        c.target_modules.push_back(e.get<std::string>());
      }
    } else if (key == "rank" || key == "k_max" || key == "phi" || key == "p") {
      if (!v.is_number_integer()) return bad("an integer");
      const int64_t x = v.get<int64_t>();
      (key == "rank" ? c.rank : key == "k_max" ? c.k_max : key == "phi" ? c.phi : c.p) = x;
    } else if (key == "seed") {
      if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0)) {
        return bad("a non-negative integer");
      }
      c.seed = v.get<uint64_t>();
    } else if (key == "alpha" || key == "ella_lambda" || key == "olora_lambda" || key == "energy_threshold") {
      if (!v.is_number()) return bad("a number");
      const double x = v.get<double>();
      (key == "alpha"          ? c.alpha
       : key == "ella_lambda"  ? c.ella_lambda
       : key == "olora_lambda" ? c.olora_lambda
                               : c.energy_threshold) = x;
    } else if (key == "ft_scope" || key == "mtl_shape" || key == "share_training") {
      if (!v.is_string()) return bad("a string");
      (key == "ft_scope" ? c.ft_scope : key == "mtl_shape" ? c.mtl_shape : c.share_training) = v.get<std::string>();
    } else if (key == "osft_urr" || key == "pm_epsilon") {
      if (!v.is_number()) return bad("a number");
      (key == "osft_urr" ? c.osft_urr : c.pm_epsilon) = v.get<double>();
    } else if (key == "osft_rank") {
      if (!v.is_string()) return bad("a string");
      c.osft_rank = v.get<std::string>();
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": unknown field \"", key,
                       "\" (valid: target_modules, rank, alpha, ella_lambda, olora_lambda, k_max, phi, p, "
                       "energy_threshold, share_training, ft_scope, mtl_shape, seed, osft_urr, osft_rank, pm_epsilon)"));
    }
  }
  return c;
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

// ---- config ------------------------------------------------------------------------------------

absl::Status ValidateMethodConfig(const MethodConfig& c) {
  auto bad = [](const std::string& field, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("method config: ", field, " ", why));
  };
  if (c.target_modules.empty()) return bad("target_modules", "must not be empty");
  for (const auto& t : c.target_modules) {
    if (t.empty()) return bad("target_modules", "must not contain an empty name");
  }
  if (c.rank < 1) return bad("rank", absl::StrCat("must be >= 1, got ", c.rank));
  if (!(std::isfinite(c.alpha) && c.alpha > 0))
    return bad("alpha", absl::StrCat("must be finite and > 0, got ", c.alpha));
  if (!(std::isfinite(c.ella_lambda) && c.ella_lambda >= 0)) {
    return bad("ella_lambda", absl::StrCat("must be finite and >= 0, got ", c.ella_lambda));
  }
  if (!(std::isfinite(c.olora_lambda) && c.olora_lambda >= 0)) {
    return bad("olora_lambda", absl::StrCat("must be finite and >= 0, got ", c.olora_lambda));
  }
  if (c.k_max < 1) return bad("k_max", absl::StrCat("must be >= 1, got ", c.k_max));
  if (c.p < 1) return bad("p", absl::StrCat("must be >= 1, got ", c.p));
  if (c.phi < 1) return bad("phi", absl::StrCat("must be >= 1, got ", c.phi));
  if (!(c.energy_threshold > 0 && c.energy_threshold <= 1)) {
    return bad("energy_threshold", absl::StrCat("must be in (0, 1], got ", c.energy_threshold));
  }
  if (c.share_training != "lora" && c.share_training != "subspace") {
    return bad("share_training",
               absl::StrCat("must be \"lora\" or \"subspace\", got \"", c.share_training, "\""));
  }
  if (c.ft_scope != "all" && c.ft_scope != "target") {
    return bad("ft_scope", absl::StrCat("must be \"all\" or \"target\", got \"", c.ft_scope, "\""));
  }
  if (c.mtl_shape != "full" && c.mtl_shape != "lora") {
    return bad("mtl_shape", absl::StrCat("must be \"full\" or \"lora\", got \"", c.mtl_shape, "\""));
  }
  if (!(c.osft_urr >= 0 && c.osft_urr <= 1)) {
    return bad("osft_urr", absl::StrCat("must be in [0, 1], got ", c.osft_urr));
  }
  if (c.osft_rank != "uniform" && c.osft_rank != "adaptive") {
    return bad("osft_rank", absl::StrCat("must be \"uniform\" or \"adaptive\", got \"", c.osft_rank, "\""));
  }
  if (!(c.pm_epsilon >= 0 && c.pm_epsilon <= 1)) {
    return bad("pm_epsilon", absl::StrCat("must be in [0, 1], got ", c.pm_epsilon));
  }
  return absl::OkStatus();
}

std::string MethodConfigToJson(const MethodConfig& config) { return ConfigToJsonValue(config).dump(); }

absl::StatusOr<MethodConfig> MethodConfigFromJson(std::string_view text, std::string_view source) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  const std::string src(source);
  if (j.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(src, ": method config is not valid JSON"));
  return ConfigFromJsonValue(j, src);
}

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

absl::Status Method::SetTaskHyperparameters(double ella_lambda, double pm_epsilon) {
  if (active_) {
    return absl::FailedPreconditionError(
        absl::StrCat("task '", active_task_, "' is active: hyper-parameters change only between tasks"));
  }
  MethodConfig next = config_;
  next.ella_lambda = ella_lambda;
  next.pm_epsilon = pm_epsilon;
  RETURN_IF_ERROR(ValidateMethodConfig(next));
  config_ = std::move(next);
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
  return absl::UnimplementedError(absl::StrCat("method ", name(),
                                               " has no task-routed weights (supported by: "
                                               "share, share_ella, inc_lora, o_lora)"));
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
  j["config"] = ConfigToJsonValue(config_);
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
  ASSIGN_OR_RETURN(MethodConfig config, ConfigFromJsonValue(j["config"], "method state config"));
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

std::vector<std::string> MethodNames() {
  return {"share_ella", "share", "ella", "seq_lora", "inc_lora", "o_lora", "seq_ft", "mtl", "osft", "pm"};
}

absl::StatusOr<std::unique_ptr<Method>> CreateMethod(const std::string& name, const MethodConfig& config) {
  const std::vector<std::string> names = MethodNames();
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown method \"", name, "\"; valid methods: ", absl::StrJoin(names, ", ")));
  }
  RETURN_IF_ERROR(ValidateMethodConfig(config));
  if (name == "share_ella") return NewShareEllaMethod(config, true, true);
  if (name == "share") return NewShareEllaMethod(config, true, false);
  if (name == "ella") return NewShareEllaMethod(config, false, true);
  if (name == "seq_lora") return NewSeqLoraMethod(config, false);
  if (name == "inc_lora") return NewIncLoraMethod(config, false);
  if (name == "o_lora") return NewIncLoraMethod(config, true);
  if (name == "seq_ft") return NewSeqFtMethod(config, false);
  if (name == "osft") return NewOsftMethod(config);
  if (name == "pm") return NewPmMethod(config);
  // mtl
  if (config.mtl_shape == "lora") return NewSeqLoraMethod(config, true);
  return NewSeqFtMethod(config, true);
}

absl::StatusOr<std::unique_ptr<Method>> CreateMethodFromState(const MethodState& state) {
  json j = json::parse(state.config_json, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("config")) {
    return absl::InvalidArgumentError("method state: config is not a JSON object with a \"config\" field");
  }
  std::string method = state.method;
  if (method.empty() && j.contains("method") && j["method"].is_string())
    method = j["method"].get<std::string>();
  ASSIGN_OR_RETURN(MethodConfig config, ConfigFromJsonValue(j["config"], "method state config"));
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

absl::Status Method::ImportPeftAdapter(const std::string& task, const PeftLoraAdapter& adapter,
                                       const CausalLM& base) {
  return absl::UnimplementedError(absl::StrCat("method ", name(),
                                               " cannot import LoRA adapters (it keeps no shared subspace); "
                                               "use share or share_ella"));
}

}  // namespace strata
