#pragma once
// Llama-family decoder-only language model (Llama, Mistral, Qwen2) on LibTorch.
//
// Owns its weights as plain tensors (no torch::nn modules), so versions can share storage:
// ShallowCopy() copies the structure and shares every tensor; replacing one layer's weight in the
// copy never touches the original. Linear layers are addressable by their HF module name
// ("model.layers.3.self_attn.q_proj") so the adaptation engine can attach a side path
// (LinearAdapter) or train a weight in place.
//
// Thread safety: Forward() on a model whose weights/adapters are not being modified is safe from
// several threads (each call with its own KVCache). Mutating calls (SetAdapter, weight
// replacement) must not race with Forward().

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/config.h"

namespace strata {

// A trainable side path on a linear layer: y = x Wᵀ + b + adapter->Forward(x).
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  // x: [..., in_features] -> [..., out_features].
  virtual at::Tensor Forward(const at::Tensor& x) = 0;
};

struct LinearLayer {
  std::string name;   // HF module name
  at::Tensor weight;  // [out_features, in_features]
  at::Tensor bias;    // undefined when the layer has no bias
  std::shared_ptr<LinearAdapter> adapter;  // optional side path
  at::Tensor Forward(const at::Tensor& x) const;
};

// Per-layer key/value cache for incremental decoding. One per sequence batch.
struct KVCache {
  std::vector<at::Tensor> keys;    // per layer [B, kv_heads, T_cached, head_dim]
  std::vector<at::Tensor> values;
  int64_t length() const;
};

struct ModelLoadOptions {
  std::string device = "cpu";      // "cpu", "cuda", "cuda:N"
  std::string dtype = "float32";   // "float32" or "bfloat16"
};

class CausalLM {
 public:
  // Loads config.json + safetensors (single or sharded) from an HF model directory.
  static absl::StatusOr<std::unique_ptr<CausalLM>> Load(const std::string& dir,
                                                        const ModelLoadOptions& options = {});
  // Random init (normal(0, 0.02), norms at 1) with a fixed seed: used for the embedded default
  // model and benchmark configs.
  static absl::StatusOr<std::unique_ptr<CausalLM>> RandomInit(const ModelConfig& config,
                                                              uint64_t seed,
                                                              const ModelLoadOptions& options = {});
  // The embedded default: a small Llama config (byte-level vocab 259) with a fixed seed.
  static ModelConfig EmbeddedDefaultConfig();

  const ModelConfig& config() const { return config_; }
  at::Device device() const;
  at::ScalarType dtype() const;

  // input_ids: [B, T] int64. attention_mask: [B, T_past + T] (1 = real token, 0 = padding),
  // covering cached positions too; may be undefined (all ones). Positions are derived from the mask
  // (cumsum - 1), so left padding works. With `cache`, appends this step's keys/values.
  // Returns logits [B, T, vocab] in float32.
  at::Tensor Forward(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                     KVCache* cache = nullptr) const;

  // All linear layers (attention q/k/v/o, MLP gate/up/down per decoder layer), in layer order.
  std::vector<std::string> LinearNames() const;
  // nullptr when absent.
  LinearLayer* FindLinear(const std::string& name);
  const LinearLayer* FindLinear(const std::string& name) const;

  // Every parameter under its HF name (embeddings, norms, linears, lm_head unless tied).
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;
  int64_t ParameterCount() const;

  // Shares every tensor with this model; adapters are not copied.
  std::unique_ptr<CausalLM> ShallowCopy() const;

  // Writes config.json + model.safetensors (HF layout) into `dir` (created; files written atomically).
  absl::Status SaveHf(const std::string& dir) const;

  // Removes every adapter.
  void ClearAdapters();

 private:
  struct DecoderLayer {
    at::Tensor input_norm;      // [hidden]
    at::Tensor post_attn_norm;  // [hidden]
    LinearLayer q, k, v, o, gate, up, down;
  };
  CausalLM() = default;
  ModelConfig config_;
  at::Tensor embed_tokens_;  // [vocab, hidden]
  at::Tensor final_norm_;    // [hidden]
  LinearLayer lm_head_;      // weight aliases embed_tokens_ when tied
  std::vector<DecoderLayer> layers_;
  at::Tensor rope_inv_freq_;  // [head_dim / 2], float32
};

}  // namespace strata
