#include "core/adapt/peft_config.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace strata {

using json = nlohmann::json;

absl::StatusOr<PeftAdapterConfig> ParsePeftAdapterConfig(const std::string& text, const std::string& source) {
  json config = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  auto bad_field = [&](const char* field, const char* what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": field '", field, "' ", what));
  };
  if (auto it = config.find("peft_type");
      it != config.end() && !(it->is_string() && it->get<std::string>() == "LORA")) {
    return absl::UnimplementedError(absl::StrCat(
        source, ": peft_type ", it->dump(-1, ' ', false, json::error_handler_t::replace), " is not LORA"));
  }
  auto flag = [&](const char* field) {
    auto it = config.find(field);
    return it != config.end() && it->is_boolean() && it->get<bool>();
  };
  if (flag("use_dora"))
    return absl::UnimplementedError(absl::StrCat(source, ": DoRA (use_dora) is not supported"));
  if (flag("fan_in_fan_out")) {
    return absl::UnimplementedError(
        absl::StrCat(source, ": fan_in_fan_out (Conv1D layers) is not supported"));
  }
  if (auto it = config.find("bias");
      it != config.end() && it->is_string() && it->get<std::string>() != "none") {
    return absl::UnimplementedError(
        absl::StrCat(source, ": bias '", it->get<std::string>(), "' is not supported"));
  }
  PeftAdapterConfig out;
  {
    auto it = config.find("r");
    // An unsigned value above INT64_MAX is not a usable rank either.
    if (it == config.end() || !it->is_number_integer() ||
        (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) ||
        it->get<int64_t>() < 1) {
      return bad_field("r", "must be a positive integer");
    }
    out.r = it->get<int64_t>();
    it = config.find("lora_alpha");
    if (it == config.end() || !it->is_number() || !std::isfinite(it->get<double>())) {
      return bad_field("lora_alpha", "must be a number");
    }
    out.lora_alpha = it->get<double>();
  }
  out.use_rslora = flag("use_rslora");
  if (auto it = config.find("target_modules"); it != config.end()) {
    if (it->is_string()) {
      out.target_modules.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      for (const json& m : *it) {
        if (!m.is_string()) return bad_field("target_modules", "must hold strings");
        out.target_modules.push_back(m.get<std::string>());
      }
    } else if (!it->is_null()) {
      return bad_field("target_modules", "must be a string or a list of strings");
    }
  }
  if (auto it = config.find("alpha_pattern"); it != config.end() && it->is_object()) {
    for (auto entry = it->begin(); entry != it->end(); ++entry) {
      if (!entry->is_number() || !std::isfinite(entry->get<double>())) {
        return bad_field("alpha_pattern", "must map to numbers");
      }
      out.alpha_pattern[entry.key()] = entry->get<double>();
    }
  }
  return out;
}

double PeftModuleAlpha(const PeftAdapterConfig& config, const std::string& module) {
  double alpha = config.lora_alpha;
  size_t best_len = 0;
  bool found = false;
  for (const auto& [key, value] : config.alpha_pattern) {
    const bool matches = module == key || absl::EndsWith(module, "." + key);
    if (matches && (!found || key.size() >= best_len)) {
      alpha = value;
      best_len = key.size();
      found = true;
    }
  }
  return alpha;
}

}  // namespace strata
