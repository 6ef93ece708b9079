#pragma once
// Model configuration from a Hugging Face `config.json` (Llama-family decoders).
// Torch-free.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace strata {

struct RopeScaling {
  // "" (none) or "llama3".
  std::string type;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  // One of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.
  std::string architecture;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads
  int64_t head_dim = 0;             // derived as hidden_size / num_attention_heads when absent
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 2048;
  int64_t vocab_size = 0;
  bool tie_word_embeddings = false;
  // q/k/v projections carry a bias (Qwen2).
  bool attention_bias = false;
  // Mistral sliding window; 0 = none.
  int64_t sliding_window = 0;
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> pad_token_id;
  // "float32", "bfloat16", "float16" as written by the checkpoint (informational).
  std::string torch_dtype;
};

// Parses config.json text. `source` names the file in error messages. Unsupported architectures
// are refused by name; missing or mistyped fields are reported with the field name.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source);
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);

// Serialises back to HF config.json (used by ExportWeights).
std::string ModelConfigToJson(const ModelConfig& config);

// Checks internal consistency (positive sizes, heads divide, kv heads divide heads).
absl::Status ValidateModelConfig(const ModelConfig& config, const std::string& source);

}  // namespace strata
