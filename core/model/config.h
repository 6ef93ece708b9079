#pragma once
// Model configuration from a Hugging Face `config.json` (Llama-family decoders), and the tensor
// names/shapes such a config implies. Torch-free.
//
// Thread safety: plain value types and pure functions; safe to call concurrently.
// Failures: absl::Status (INVALID_ARGUMENT for malformed/unsupported configs, NOT_FOUND for a
// missing file) whose message names the file and the field.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
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
bool operator==(const RopeScaling& a, const RopeScaling& b);
inline bool operator!=(const RopeScaling& a, const RopeScaling& b) { return !(a == b); }

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
bool operator==(const ModelConfig& a, const ModelConfig& b);
inline bool operator!=(const ModelConfig& a, const ModelConfig& b) { return !(a == b); }

// Parses config.json text. `source` names the file in error messages. Unsupported architectures
// are refused by name; missing or mistyped fields are reported with the field name.
//  - architecture: the first entry of "architectures" (falls back to "model_type" llama/mistral/
//    qwen2 when "architectures" is absent).
//  - required: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size.
//  - num_key_value_heads absent/null -> num_attention_heads; head_dim absent/null ->
//    hidden_size / num_attention_heads (which must then divide evenly).
//  - rope_scaling: null, absent, or {"rope_type"|"type": "default"} -> none; "llama3" needs factor,
//    low_freq_factor, high_freq_factor, original_max_position_embeddings; other types are refused.
//  - Qwen2ForCausalLM always has q/k/v biases (attention_bias = true); LlamaForCausalLM reads
//    "attention_bias"; Mistral has none. sliding_window is read for Mistral (null -> 0); Qwen2
//    with use_sliding_window=true is refused. mlp_bias=true and hidden_act other than silu are
//    refused.
//  - bos/eos/pad_token_id: int, list of ints (bos/pad take the first) or null; a negative
//    pad_token_id (old Llama exports write -1) means none.
// The result has passed ValidateModelConfig.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source);
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);

// Serialises back to HF config.json (used by ExportWeights). ParseModelConfig(ModelConfigToJson(c))
// == c for every valid config (rope_scaling parameters are only written for type "llama3").
std::string ModelConfigToJson(const ModelConfig& config);

// Checks internal consistency (positive sizes, heads divide, kv heads divide heads).
// Also: head_dim even (RoPE), positive eps/theta/max positions, llama3 rope parameters sane,
// token ids within [0, vocab_size).
absl::Status ValidateModelConfig(const ModelConfig& config, const std::string& source);

// One tensor an HF checkpoint of `config` must (or may) contain.
struct ExpectedTensor {
  std::string name;            // e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;  // e.g. {num_attention_heads * head_dim, hidden_size}
  bool optional = false;       // true only for lm_head.weight when tie_word_embeddings
};

// The tensors of a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM checkpoint in HF
// module order: model.embed_tokens.weight [vocab, hidden]; per layer N
// model.layers.N.{input_layernorm,post_attention_layernorm}.weight [hidden],
// self_attn.q_proj.weight [heads*head_dim, hidden], self_attn.{k,v}_proj.weight
// [kv_heads*head_dim, hidden], self_attn.o_proj.weight [hidden, heads*head_dim],
// (attention_bias) self_attn.{q,k,v}_proj.bias, mlp.{gate,up}_proj.weight [intermediate, hidden],
// mlp.down_proj.weight [hidden, intermediate]; model.norm.weight [hidden]; lm_head.weight
// [vocab, hidden] (optional when tie_word_embeddings: a tied checkpoint that still stores
// lm_head.weight is accepted if its shape matches; the decoder then uses embed_tokens).
std::vector<ExpectedTensor> ExpectedLlamaTensors(const ModelConfig& config);

// Names a checkpoint may carry that are not weights and are ignored by the checks and the
// decoder: non-persistent rotary buffers ("...rotary_emb.inv_freq").
bool IsIgnoredCheckpointTensor(const std::string& name);

// Compares a checkpoint's tensor shapes (name -> shape) with ExpectedLlamaTensors(config).
// INVALID_ARGUMENT listing missing names, unexpected names and shape mismatches (the first 5 of
// each, with counts), prefixed by `source`. Ignored names (IsIgnoredCheckpointTensor) are skipped.
absl::Status CheckLlamaTensorShapes(const ModelConfig& config,
                                    const std::map<std::string, std::vector<int64_t>>& shapes,
                                    const std::string& source);

}  // namespace strata
