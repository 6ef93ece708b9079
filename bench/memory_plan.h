#pragma once
// Memory planner behind `strata bench memory`: from a model config alone (no weights), the bytes of
// the weights, the KV cache per token, and per adaptation method the adaptation state (in memory
// beyond the served weights, and in a checkpoint), the training-time trainable/gradient/optimizer
// bytes and the activation peak of one training step at a given batch and sequence length.
//
// The formulas follow what this code base allocates (core/model/model.cc's forward graph, the
// Trainer's AdamW with flat fp32 buffers, each method's state); they are an estimate, checked
// against measured peak RSS on the CPU configs (docs/benchmarks.md, "Memory plan"). Torch-free.
//
// Thread safety: pure functions. Failures: INVALID_ARGUMENT naming the option.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/config.h"

namespace strata::bench {

// The configs of the 7B-class presets ("llama-8b" = Llama-3-8B, "mistral-7b" = Mistral-7B-v0.3,
// "qwen2-7b" = Qwen2-7B) as their HF config.json states them. INVALID_ARGUMENT for other names.
absl::StatusOr<ModelConfig> PresetModelConfig(const std::string& name);
std::vector<std::string> PresetModelNames();

struct MemoryPlanOptions {
  std::string dtype = "bfloat16";  // weight dtype: float32, bfloat16, float16
  std::string device = "cuda";     // "cpu" computes activations in float32 whatever the weight dtype
  int64_t batch_size = 8;
  int64_t seq_len = 256;
  // Short names (q_proj, ..., down_proj) or "all-linear" (the server default).
  std::vector<std::string> targets = {"all-linear"};
  int64_t rank = 8;          // LoRA rank r / Share p
  int64_t k_max = 32;        // Share subspace rank (assumed reached)
  int64_t tasks = 100;       // learned tasks (state that grows per task)
  double ella_lambda = 0.0;  // > 0: ella / share_ella keep a dense float32 Ŵ_past during a task
  double osft_urr = 0.25;
};

struct MethodMemory {
  std::string method;
  int64_t trainable_parameters = 0;
  // Adaptation state in memory beyond the served weights (between tasks).
  int64_t state_bytes = 0;
  // Bytes a checkpoint stores (method.safetensors).
  int64_t checkpoint_bytes = 0;
  // Extra state held only while a task trains (ELLA's Ŵ_past for λ > 0, OSFT's frozen bases).
  int64_t task_state_bytes = 0;
  // Trainable tensors + gradients (+ a trained copy of the weights for full fine-tuning).
  int64_t trainable_bytes = 0;
  int64_t optimizer_bytes = 0;   // AdamW exp_avg + exp_avg_sq
  int64_t activation_bytes = 0;  // peak of one training step's forward + backward
  // Training peak on top of the served weights: state + task state + trainable + optimizer +
  // activations.
  int64_t training_peak_bytes = 0;
};

struct MemoryPlan {
  ModelConfig config;
  MemoryPlanOptions options;
  int64_t parameters = 0;
  int64_t weight_bytes = 0;         // every parameter in `dtype`
  int64_t adapted_parameters = 0;   // the target modules' weights
  int64_t kv_bytes_per_token = 0;   // keys + values of every layer, in the compute dtype
  int64_t compute_dtype_bytes = 0;  // 4 on CPU, the weight dtype's size on CUDA
  std::vector<MethodMemory> methods;
};

// INVALID_ARGUMENT for an unknown dtype/device/target/method or non-positive sizes. `methods`
// empty = every method (MethodNames order).
absl::StatusOr<MemoryPlan> PlanMemory(const ModelConfig& config, const MemoryPlanOptions& options,
                                      const std::vector<std::string>& methods = {});

// Activation peak of one training step (forward graph saved for backward + the loss head), in
// bytes. full_ft: every linear is trained (seq_ft, mtl); otherwise the target modules are, through
// rank-r adapters when `adapters` (else their weights, as OSFT).
int64_t ActivationPeakBytes(const ModelConfig& config, const MemoryPlanOptions& options, bool full_ft,
                            bool adapters = true);

}  // namespace strata::bench
