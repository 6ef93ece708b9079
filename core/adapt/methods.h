#pragma once
// Constructors of the concrete methods (used by CreateMethod in method.cc; tests may call them).
// The configs are validated by CreateMethod; these do not validate again.

#include <memory>

#include "core/adapt/method.h"

namespace strata {

// methods_baseline.cc
// seq_lora: one LoRA (rank, alpha) carried across all tasks; served W0 + s·B A.
// With `joint` it is mtl's LoRA shape (named "mtl").
std::unique_ptr<Method> NewSeqLoraMethod(const MethodConfig& config, bool joint = false);
// inc_lora: a new LoRA per task, earlier ones frozen and merged; served W0 + Σ_i s·B_i A_i.
// o_lora: inc_lora + λ1 Σ_{i<t} Σ |A_i A_tᵀ|.
std::unique_ptr<Method> NewIncLoraMethod(const MethodConfig& config, bool orthogonal);
// seq_ft: full fine-tuning in sequence (ft_scope "all" or "target"). With `joint`: mtl full.
std::unique_ptr<Method> NewSeqFtMethod(const MethodConfig& config, bool joint = false);

// methods_share_ella.cc
// share (use_ella = false), ella (use_share = false), share_ella (both).
std::unique_ptr<Method> NewShareEllaMethod(const MethodConfig& config, bool use_share, bool use_ella);

}  // namespace strata
