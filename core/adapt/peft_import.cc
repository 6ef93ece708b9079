#include "core/adapt/peft_import.h"

#include <torch/torch.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/adapt/peft_config.h"
#include "core/model/safetensors.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

using json = nlohmann::json;

constexpr char kConfigFile[] = "adapter_config.json";
constexpr char kWeightsFile[] = "adapter_model.safetensors";
constexpr char kPrefix[] = "base_model.model.";

std::string JoinPath(const std::string& dir, const std::string& file) {
  if (!dir.empty() && dir.back() == '/') return dir + file;
  return dir + "/" + file;
}

enum class LoraSide { kA, kB };

// Splits a PEFT tensor name into (module, side). Errors name the tensor.
absl::StatusOr<std::pair<std::string, LoraSide>> ParseTensorName(const std::string& path,
                                                                 const std::string& name) {
  auto unsupported = [&](const char* what) {
    return absl::UnimplementedError(absl::StrCat(path, ": tensor '", name, "': ", what, " is not supported"));
  };
  if (absl::StrContains(name, "lora_embedding_")) return unsupported("LoRA on embeddings");
  if (absl::StrContains(name, "lora_magnitude_vector")) return unsupported("DoRA (lora_magnitude_vector)");
  if (absl::StrContains(name, "modules_to_save")) return unsupported("modules_to_save (full weights)");
  std::string rest = name;
  if (absl::StartsWith(rest, kPrefix)) rest = rest.substr(sizeof(kPrefix) - 1);
  for (const auto& [marker, side] : {std::make_pair(std::string(".lora_A."), LoraSide::kA),
                                     std::make_pair(std::string(".lora_B."), LoraSide::kB)}) {
    size_t pos = rest.rfind(marker);
    if (pos == std::string::npos) continue;
    std::string module = rest.substr(0, pos);
    std::string tail = rest.substr(pos + marker.size());  // "weight" or "<adapter>.weight"
    if (absl::EndsWith(tail, "bias")) return unsupported("a LoRA bias");
    if (module.empty() ||
        !(tail == "weight" || (absl::EndsWith(tail, ".weight") && tail.find('.') == tail.size() - 7))) {
      break;
    }
    return std::make_pair(module, side);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      path, ": tensor '", name, "' is not a LoRA factor (expected <module>.lora_A.weight / .lora_B.weight)"));
}

}  // namespace

at::Tensor PeftLoraModule::Delta() const { return b.mm(a).mul(scale); }

absl::StatusOr<PeftLoraAdapter> ReadPeftLoraAdapter(const std::string& dir) {
  const std::string config_path = JoinPath(dir, kConfigFile);
  const std::string weights_path = JoinPath(dir, kWeightsFile);
  if (!PathExists(config_path))
    return absl::NotFoundError(absl::StrCat("PEFT adapter: missing ", config_path));
  if (!PathExists(weights_path)) {
    if (PathExists(JoinPath(dir, "adapter_model.bin"))) {
      return absl::UnimplementedError(absl::StrCat("PEFT adapter ", dir,
                                                   ": only adapter_model.bin (pickle) found; save it with "
                                                   "safe_serialization=True (adapter_model.safetensors)"));
    }
    return absl::NotFoundError(absl::StrCat("PEFT adapter: missing ", weights_path));
  }
  ASSIGN_OR_RETURN(std::string text, ReadFile(config_path));
  ASSIGN_OR_RETURN(PeftAdapterConfig config, ParsePeftAdapterConfig(text, config_path));
  PeftLoraAdapter adapter;
  adapter.r = config.r;
  adapter.lora_alpha = config.lora_alpha;
  adapter.use_rslora = config.use_rslora;
  adapter.target_modules = config.target_modules;

  ASSIGN_OR_RETURN(std::shared_ptr<SafetensorsFile> file, SafetensorsFile::Open(weights_path));
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> factors;  // module -> (A, B)
  std::map<std::string, std::pair<std::string, std::string>> names;  // module -> tensor names
  for (const auto& [name, entry] : file->entries()) {
    ASSIGN_OR_RETURN(auto parsed, ParseTensorName(weights_path, name));
    ASSIGN_OR_RETURN(at::Tensor t, file->Get(name, at::kFloat));
    if (t.dim() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": tensor '", name, "' is not 2-D"));
    }
    t = t.clone().contiguous();  // detach from the mapping
    if (!at::isfinite(t).all().item<bool>()) {
      return absl::InvalidArgumentError(
          absl::StrCat(weights_path, ": tensor '", name, "' has non-finite values"));
    }
    auto& slot = factors[parsed.first];
    auto& slot_name = names[parsed.first];
    at::Tensor& dst = parsed.second == LoraSide::kA ? slot.first : slot.second;
    std::string& dst_name = parsed.second == LoraSide::kA ? slot_name.first : slot_name.second;
    if (dst.defined()) {
      return absl::InvalidArgumentError(
          absl::StrCat(weights_path, ": tensors '", dst_name, "' and '", name,
                       "' are the same LoRA factor (several adapters in one file?)"));
    }
    dst = t;
    dst_name = name;
  }
  for (auto& [module, ab] : factors) {
    const auto& [a, b] = ab;
    if (!a.defined() || !b.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": module '", module, "' has lora_",
                                                     a.defined() ? "A" : "B", " but no lora_",
                                                     a.defined() ? "B" : "A"));
    }
    if (a.size(0) != b.size(1) || a.size(0) < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(weights_path, ": module '", module, "': lora_A '", names[module].first, "' is [",
                       a.size(0), ", ", a.size(1), "] but lora_B '", names[module].second, "' is [",
                       b.size(0), ", ", b.size(1), "] (ranks differ)"));
    }
    const int64_t rank = a.size(0);
    const double alpha = PeftModuleAlpha(config, module);
    PeftLoraModule m;
    m.a = a;
    m.b = b;
    m.scale =
        adapter.use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
    adapter.modules.emplace(module, std::move(m));
  }
  if (adapter.modules.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(weights_path, ": no LoRA factors"));
  }
  return adapter;
}

absl::Status WritePeftLoraAdapter(const std::string& dir, const PeftLoraAdapter& adapter) {
  if (adapter.r < 1 || !(adapter.lora_alpha > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("PEFT write ", dir, ": bad r=", adapter.r, " lora_alpha=", adapter.lora_alpha));
  }
  json rank_pattern = json::object();
  json alpha_pattern = json::object();
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::set<std::string> targets(adapter.target_modules.begin(), adapter.target_modules.end());
  for (const auto& [module, m] : adapter.modules) {
    if (!m.a.defined() || !m.b.defined() || m.a.dim() != 2 || m.b.dim() != 2 || m.a.size(0) != m.b.size(1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("PEFT write ", dir, ": module '", module, "' has bad factors"));
    }
    const int64_t rank = m.a.size(0);
    const double alpha = adapter.use_rslora ? m.scale * std::sqrt(static_cast<double>(rank)) : m.scale * rank;
    if (rank != adapter.r) rank_pattern[module] = rank;
    if (std::abs(alpha - adapter.lora_alpha) > 1e-9 * std::abs(adapter.lora_alpha))
      alpha_pattern[module] = alpha;
    tensors.emplace_back(absl::StrCat(kPrefix, module, ".lora_A.weight"),
                         m.a.detach().to(at::kCPU).contiguous());
    tensors.emplace_back(absl::StrCat(kPrefix, module, ".lora_B.weight"),
                         m.b.detach().to(at::kCPU).contiguous());
    if (adapter.target_modules.empty()) {
      size_t dot = module.rfind('.');
      targets.insert(dot == std::string::npos ? module : module.substr(dot + 1));
    }
  }
  // LoraConfig's fields as PEFT's save_pretrained writes them (loaders that know fewer fields, such as
  // vLLM's, drop the rest).
  json config;
  config["peft_type"] = "LORA";
  config["task_type"] = "CAUSAL_LM";
  config["base_model_name_or_path"] =
      adapter.base_model_name_or_path.empty() ? json(nullptr) : json(adapter.base_model_name_or_path);
  config["revision"] = nullptr;
  config["inference_mode"] = true;
  config["r"] = adapter.r;
  // An integral alpha as an integer, as PEFT users write it (vLLM's PEFTHelper types it int).
  if (adapter.lora_alpha == std::floor(adapter.lora_alpha) && adapter.lora_alpha < 1e15) {
    config["lora_alpha"] = static_cast<int64_t>(adapter.lora_alpha);
  } else {
    config["lora_alpha"] = adapter.lora_alpha;
  }
  config["lora_dropout"] = 0.0;
  config["bias"] = "none";
  config["fan_in_fan_out"] = false;
  config["use_rslora"] = adapter.use_rslora;
  config["use_dora"] = false;
  config["init_lora_weights"] = true;
  config["modules_to_save"] = nullptr;
  config["layers_to_transform"] = nullptr;
  config["layers_pattern"] = nullptr;
  config["target_modules"] = adapter.target_modules.empty()
                                 ? std::vector<std::string>(targets.begin(), targets.end())
                                 : adapter.target_modules;
  config["rank_pattern"] = rank_pattern;
  config["alpha_pattern"] = alpha_pattern;
  RETURN_IF_ERROR(MakeDirs(dir));
  RETURN_IF_ERROR(WriteSafetensors(JoinPath(dir, kWeightsFile), tensors, {{"format", "pt"}}));
  return WriteFileAtomic(JoinPath(dir, kConfigFile), config.dump(2));
}

absl::Status MergePeftIntoShare(const PeftLoraAdapter& adapter, const std::string& task,
                                const ShareOptions& options, std::map<std::string, ShareModule>* modules) {
  if (task.empty()) return absl::InvalidArgumentError("PEFT import: empty task name");
  RETURN_IF_ERROR(options.Validate());
  for (const auto& [name, module] : *modules) {
    if (module.HasTask(task)) {
      return absl::AlreadyExistsError(
          absl::StrCat("PEFT import: module '", name, "' already has task '", task, "'"));
    }
  }
  for (const auto& [name, m] : adapter.modules) {
    if (!m.a.defined() || !m.b.defined() || m.a.dim() != 2 || m.b.dim() != 2 || m.a.size(0) != m.b.size(1)) {
      return absl::InvalidArgumentError(absl::StrCat("PEFT import: module '", name, "' has bad factors"));
    }
    auto it = modules->find(name);
    if (it != modules->end() &&
        (it->second.out_features() != m.b.size(0) || it->second.in_features() != m.a.size(1))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PEFT import: module '", name, "' is [", m.b.size(0), ", ", m.a.size(1), "] in the adapter but [",
          it->second.out_features(), ", ", it->second.in_features(), "] in the subspace"));
    }
  }
  // Work on a copy (merges never write into existing tensors) and commit at the end.
  std::map<std::string, ShareModule> updated = *modules;
  for (const auto& [name, m] : adapter.modules) {
    auto it = updated.find(name);
    if (it == updated.end()) {
      ASSIGN_OR_RETURN(ShareModule fresh, ShareModule::Create(m.b.size(0), m.a.size(1), options));
      it = updated.emplace(name, std::move(fresh)).first;
    }
    absl::Status s = it->second.MergeLora(task, m.b, m.a, m.scale);
    if (!s.ok())
      return absl::Status(s.code(), absl::StrCat("PEFT import: module '", name, "': ", s.message()));
  }
  for (auto& [name, module] : updated) {
    if (adapter.modules.count(name)) continue;
    RETURN_IF_ERROR(module.MergeFactors(task, at::zeros({module.out_features(), 0}),
                                        at::zeros({0, module.in_features()})));
  }
  *modules = std::move(updated);
  return absl::OkStatus();
}

}  // namespace strata
