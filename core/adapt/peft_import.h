#pragma once
// Reading and writing PEFT LoRA adapter directories, and folding one into Share subspaces as a new
// task (docs ALGORITHMS.md section 1, step 5).
//
// A PEFT LoRA directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha,
// target_modules, optional use_rslora / rank_pattern / alpha_pattern) and
// `adapter_model.safetensors` with, per adapted linear layer,
//   base_model.model.<module>.lora_A.weight  [r, d]   and   base_model.model.<module>.lora_B.weight [n, r]
// (an adapter-name infix such as `.lora_A.default.weight` is accepted too). <module> is the HF module
// name, e.g. "model.layers.0.self_attn.q_proj". ΔW = scale·B·A with scale = alpha/r (alpha/√r with
// use_rslora), alpha taken from alpha_pattern when a key matches the module, else lora_alpha; the rank
// of each module is read from its tensors. Pattern keys are matched literally as a dotted suffix
// of the module name (PEFT treats them as regexes; plain names, the common case, behave the same).
//
// Failures: NOT_FOUND (missing directory/file), INVALID_ARGUMENT (malformed config or tensors,
// naming the file, field or tensor), UNIMPLEMENTED (DoRA, fan_in_fan_out, LoRA biases,
// modules_to_save, embedding LoRA, pickle-only adapters). Thread-compatible free functions.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/adapt/share.h"

namespace strata {

struct PeftLoraModule {
  at::Tensor a;              // lora_A [r, d] float32 CPU
  at::Tensor b;              // lora_B [n, r] float32 CPU
  double scale = 1.0;        // ΔW = scale·b·a
  at::Tensor Delta() const;  // [n, d]
};

struct PeftLoraAdapter {
  int64_t r = 0;
  double lora_alpha = 0.0;
  bool use_rslora = false;
  std::vector<std::string> target_modules;
  // adapter_config.json's base_model_name_or_path (written; not read back: the import checks shapes).
  std::string base_model_name_or_path;
  std::map<std::string, PeftLoraModule> modules;  // by HF module name
};

// Reads `dir`/adapter_config.json and `dir`/adapter_model.safetensors (tensors copied to float32).
absl::StatusOr<PeftLoraAdapter> ReadPeftLoraAdapter(const std::string& dir);

// Writes a PEFT-loadable directory (created if needed; files written atomically): the tensors as
// PEFT's save_pretrained names them (base_model.model.<module>.lora_A.weight, no adapter name) and
// every LoraConfig field a loader may look for. Modules whose rank or scale differ from adapter.r /
// adapter.lora_alpha get rank_pattern / alpha_pattern entries (vLLM and LoRAX ignore those: give
// every module the same rank and scale for them, as peft_export.h does). target_modules: the
// adapter's, else the modules' last name parts.
absl::Status WritePeftLoraAdapter(const std::string& dir, const PeftLoraAdapter& adapter);

// Merges `adapter` into the Share modules as task `task` (no gradient steps): each adapter module
// is merged with MergeLora(task, b, a, scale) (the foreign scale folded into B). Modules of the
// adapter missing from `modules` are created with `options` and the adapter's sizes; modules in
// `modules` that the adapter does not touch record `task` with rank 0 (ΔW = 0), so every module
// knows every task. All or nothing: on error `modules` is unchanged. INVALID_ARGUMENT when a size
// does not match an existing module, ALREADY_EXISTS when any module already has `task`.
absl::Status MergePeftIntoShare(const PeftLoraAdapter& adapter, const std::string& task,
                                const ShareOptions& options, std::map<std::string, ShareModule>* modules);

}  // namespace strata
