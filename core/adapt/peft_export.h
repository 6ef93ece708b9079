#pragma once
// A model update as a PEFT LoRA adapter: the exact factors of a low-rank update (a task route of
// share, share_ella, inc_lora, o_lora), or the best rank-r approximation of any update (truncated
// SVD, Eckart–Young), with the relative error it costs. The inverse of ReadPeftLoraAdapter
// (peft_import.h): what FactorizeForPeft returns, written with WritePeftLoraAdapter and read back,
// gives the same ΔW up to float32 rounding (and the truncation, when a rank is asked for).
//
// Every module is factorised as ΔW = U S Vᵀ and stored with balanced factors B = U √S [n×r],
// A = √S Vᵀ [r×d] and scale 1 (lora_alpha = r). All modules get the same rank r (a module of lower
// rank is padded with zero rows/columns, which changes nothing), so the adapter needs no
// rank_pattern / alpha_pattern: vLLM and LoRAX, which apply one lora_alpha / r to every module, read
// it as PEFT does.
//
// Thread-compatible free functions; failures are absl::Status naming the module.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/adapt/peft_import.h"

namespace strata {

// One module's update ΔW [n×d], either low-rank, ΔW = scale · left · core · rightᵀ with left [n×p],
// core [p×q] (undefined: the identity, p = q) and right [d×q] (a LoRA: left = B, right = Aᵀ), or
// `dense` [n×d] (left and right undefined). Any dtype and device.
struct ModuleUpdate {
  std::string module;  // HF module name, e.g. "model.layers.0.self_attn.q_proj"
  at::Tensor left, core, right;
  double scale = 1.0;
  at::Tensor dense;
};

struct PeftFactorization {
  // r = lora_alpha = `rank`, every module with scale 1 (float32, CPU). target_modules and
  // base_model_name_or_path are left to the caller.
  PeftLoraAdapter adapter;
  int64_t rank = 0;
  // The rank an exact export needs: the largest module rank, counting the singular values above
  // 1e-6 of the module's largest (those below are float32 rounding noise; at most min(p, q) for a
  // low-rank update, min(n, d) for a dense one).
  int64_t exact_rank = 0;
  // ‖ΔW − B A‖_F / ‖ΔW‖_F over every module together, from the dropped singular values (0 when
  // none was dropped or ΔW = 0; ~1e-8 when only noise was), and the largest such error of one module.
  double relative_error = 0;
  double max_module_error = 0;
  std::string max_error_module;
};

// Factorises `updates`. max_rank 0: exact (rank = exact_rank, at least 1); > 0: rank
// min(max_rank, exact_rank), each module's best approximation of that rank. INVALID_ARGUMENT for no update, a
// negative max_rank, or a module whose tensors do not fit together (naming it).
absl::StatusOr<PeftFactorization> FactorizeForPeft(const std::vector<ModuleUpdate>& updates,
                                                   int64_t max_rank);

// adapter_config.json's target_modules for an adapter on `exported` (HF module names) of a model whose
// linear layers are `all_linear`: the last name parts ("q_proj") when every layer with that name is
// exported (the usual case: PEFT matches them against every layer), else the full module names.
std::vector<std::string> PeftTargetModules(const std::vector<std::string>& exported,
                                           const std::vector<std::string>& all_linear);

}  // namespace strata
