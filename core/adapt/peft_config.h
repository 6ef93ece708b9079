#pragma once
// The torch-free part of PEFT LoRA import: parsing and checking adapter_config.json (see
// peft_import.h for the directory layout). Separate so that it can be fuzzed without LibTorch.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace strata {

struct PeftAdapterConfig {
  int64_t r = 0;
  double lora_alpha = 0.0;
  bool use_rslora = false;
  std::vector<std::string> target_modules;
  // alpha_pattern: module-name suffix -> alpha (finite numbers).
  std::map<std::string, double> alpha_pattern;
};

// Parses adapter_config.json text. INVALID_ARGUMENT naming `source` and the field (not a JSON
// object, r not a positive integer, lora_alpha / alpha_pattern values not finite numbers,
// target_modules not strings); UNIMPLEMENTED for peft_type other than LORA, use_dora,
// fan_in_fan_out and LoRA biases. Never throws.
absl::StatusOr<PeftAdapterConfig> ParsePeftAdapterConfig(const std::string& text, const std::string& source);

// The alpha of `module`: the longest alpha_pattern key that equals the module name or is a dotted
// suffix of it, else lora_alpha.
double PeftModuleAlpha(const PeftAdapterConfig& config, const std::string& module);

}  // namespace strata
