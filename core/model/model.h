#pragma once
// Llama-family decoder-only language model (Llama, Mistral, Qwen2) on LibTorch.
//
// Owns its weights as plain tensors (no torch::nn modules), so versions can share storage:
// ShallowCopy() copies the structure and shares every tensor; replacing one layer's weight in the
// copy never touches the original. Linear layers are addressable by their HF module name
// ("model.layers.3.self_attn.q_proj") so the adaptation engine can attach a side path
// (LinearAdapter) or train a weight in place.
//
// Note that sharing is by tensor: training a weight of a copy *in place* (weight.add_()) changes the
// original too; clone the tensors you train in place first (or assign a new tensor to the slot).
//
// Thread safety: Forward() on a model whose weights/adapters are not being modified is safe from
// several threads (each call with its own KVCache). Mutating calls (setting LinearLayer::adapter,
// weight replacement, ClearAdapters) must not race with Forward().

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
  // A low-rank side path y = scale · (x Aᵀ) Bᵀ may expose B [n×r], A [r×d] and its scale, so that
  // a decode batch runs the side paths of many routes as two GEMMs over their concatenated
  // factors (DecodeBatch). Default: false (not low-rank; the batch calls Forward per route).
  virtual bool LowRankFactors(at::Tensor* b, at::Tensor* a, double* scale) const {
    (void)b;
    (void)a;
    (void)scale;
    return false;
  }
  // A side path through a basis shared with other routes, y = scale · ((x R) Cᵀ) Lᵀ with
  // L [n×kl], C [kl×kr] (this route's core) and R [d×kr], may expose them: routes whose L and R are
  // the same tensors run as one side path with a per-row core (DecodeBatch). Default: false.
  virtual bool SharedBasisFactors(at::Tensor* left, at::Tensor* core, at::Tensor* right,
                                  double* scale) const {
    (void)left;
    (void)core;
    (void)right;
    (void)scale;
    return false;
  }
};

struct LinearLayer {
  std::string name;                        // HF module name
  at::Tensor weight;                       // [out_features, in_features]
  at::Tensor bias;                         // undefined when the layer has no bias
  std::shared_ptr<LinearAdapter> adapter;  // optional side path
  // x [..., in] -> [..., out]. weight/bias are cast to x's dtype when they differ (bf16 weights
  // computing in float32 on CPU; differentiable, so gradients reach the stored weight), and the
  // adapter's output is added in the result's dtype (an undefined output adds nothing).
  at::Tensor Forward(const at::Tensor& x) const;
};

// Per-layer key/value cache for incremental decoding, one per batch of sequences. Buffers are
// preallocated (Reserve, or grown by doubling) so a decode step writes its keys/values in place
// and never copies or recomputes the prefix. Owns its tensors; not thread-safe (one user at a
// time). Inference only: writing into the buffers in place is not meant for autograd.
class KVCache {
 public:
  // Number of cached positions (the same for every layer after a complete Forward()).
  int64_t length() const { return lengths_.empty() ? 0 : lengths_[0]; }
  // Capacity hint in positions: the next allocation holds at least `positions` entries.
  void Reserve(int64_t positions) { reserve_ = positions; }
  void Clear();
  // Batch rows held (0 before the first Append).
  int64_t rows() const { return keys_.empty() || !keys_[0].defined() ? 0 : keys_[0].size(0); }
  // Keeps only the batch rows `rows` (int64 indices; an index may repeat, which copies that row),
  // e.g. to drop finished sequences, and drops the first `drop_front` positions of every row (left
  // padding that no kept row needs any more).
  void SelectRows(const at::Tensor& rows, int64_t drop_front = 0);
  // Appends the rows of `other` (same layers, heads and head size) after this cache's rows. The
  // shorter side is left-padded with zero keys/values to the longer length, so every row's real
  // positions stay right-aligned (the caller masks the padding). An empty cache takes `other`'s rows.
  // When `other` is no longer than this cache and spare rows are allocated (rows grow by doubling),
  // only `other`'s rows are written; otherwise every row is copied once into a larger buffer.
  void AddRows(const KVCache& other);
  // Drops the batch rows `rows` (distinct indices, any order) by moving the last rows into the
  // freed places, so only the moved rows' positions are copied (no new buffer). Returns, for each
  // remaining row in its new order, its index before the call.
  std::vector<int64_t> RemoveRows(std::vector<int64_t> rows);

  // Appends k/v [B, kv_heads, T, head_dim] to `layer` and returns views of all cached keys and
  // values [B, kv_heads, length + T, head_dim]. Used by CausalLM::Forward.
  std::pair<at::Tensor, at::Tensor> Append(size_t layer, const at::Tensor& k, const at::Tensor& v);

 private:
  // Re-points keys_/values_ of `layer` at the first `rows` rows of its row store.
  void ViewRows(size_t layer, int64_t rows);

  std::vector<at::Tensor> keys_;  // per layer [B, kv_heads, capacity, head_dim]: rows [0, B) of ...
  std::vector<at::Tensor> values_;
  std::vector<at::Tensor> key_store_;  // ... per layer [row capacity >= B, kv_heads, capacity, head_dim]
  std::vector<at::Tensor> value_store_;
  std::vector<int64_t> lengths_;  // per layer valid positions
  int64_t reserve_ = 0;
};

struct ModelLoadOptions {
  std::string device = "cpu";  // "cpu", "cuda", "cuda:N" (checked with ResolveDevice)
  // "float32" or "bfloat16": the dtype weights are stored in (see CausalLM::compute_dtype());
  // "float16" only on CUDA.
  std::string dtype = "float32";
};

// The rotary inverse frequencies of `config` (head_dim / 2 values): 1 / theta^(2i / head_dim),
// adjusted by "llama3" rope scaling (HF's _compute_llama3_parameters) when configured.
std::vector<double> RopeInverseFrequencies(const ModelConfig& config);

// Llama / Mistral / Qwen2 decoder: RMSNorm (computed in float32), rotary embeddings (HF
// rotate_half convention, rope_theta, optional "llama3" rope scaling), grouped-query attention
// with causal + padding masks, SwiGLU MLP, tied or separate lm_head, optional q/k/v biases.
// Mistral's sliding_window is applied through the attention mask (each query sees the
// `sliding_window` most recent positions, itself included, as in HF); the KV cache still keeps
// every position (no rolling buffer), so memory grows with the full sequence.
//
// Failures: factory functions return absl::Status naming the directory/file/tensor. Forward()
// throws c10::Error (TORCH_CHECK) on malformed inputs (wrong rank, batch size or mask length).
class CausalLM {
 public:
  // Loads config.json + safetensors (single or sharded) from an HF model directory. Tensor names
  // and shapes are checked against the config (CheckLlamaTensorShapes); a missing lm_head.weight
  // means tied embeddings.
  static absl::StatusOr<std::unique_ptr<CausalLM>> Load(const std::string& dir,
                                                        const ModelLoadOptions& options = {});
  // Builds a model from HF-named tensors (any dtype/device; converted to options'). `source`
  // prefixes error messages. Same checks as Load().
  static absl::StatusOr<std::unique_ptr<CausalLM>> FromTensors(
      const ModelConfig& config, const std::map<std::string, at::Tensor>& tensors,
      const ModelLoadOptions& options = {}, const std::string& source = "tensors");
  // (Load, FromTensors and RandomInit create ordinary tensors: do not call them under
  // c10::InferenceMode if the weights may be trained later.)
  // Random init (normal(0, 0.02), norms at 1, biases at 0) with a fixed seed: used for the
  // embedded default model and benchmark configs. Deterministic for a given (config, seed).
  static absl::StatusOr<std::unique_ptr<CausalLM>> RandomInit(const ModelConfig& config, uint64_t seed,
                                                              const ModelLoadOptions& options = {});
  // The embedded default: a small Llama config for the byte-level default tokenizer (vocab 259,
  // hidden 64, 4 layers, 4 heads, 2 KV heads, intermediate 176, 512 positions, BOS 1, EOS 2, tied).
  static ModelConfig EmbeddedDefaultConfig();

  const ModelConfig& config() const { return config_; }
  at::Device device() const;
  // The dtype the weights are stored in.
  at::ScalarType dtype() const;
  // The dtype activations are computed in: float32 on CPU (LibTorch's CPU bf16 matmul is ~25x
  // slower than float32 and drifts from the float32 reference; bf16 weights are cast per use, so
  // a bf16 model costs half the memory and computes like float32), the storage dtype on CUDA.
  // The KV cache holds this dtype.
  at::ScalarType compute_dtype() const;

  // input_ids: [B, T] int64. attention_mask: [B, T_past + T] (1 = real token, 0 = padding),
  // covering cached positions too; may be undefined (all ones). Positions are derived from the mask
  // (cumsum - 1), so left padding works. With `cache`, appends this step's keys/values.
  // `logits_to_keep` > 0 computes logits for the last that many positions only (prefill for
  // generation needs 1). Returns logits [B, T or logits_to_keep, vocab] in float32.
  // Autograd-friendly: no grad mode is set here; callers choose (Generate uses InferenceMode).
  at::Tensor Forward(const at::Tensor& input_ids, const at::Tensor& attention_mask, KVCache* cache = nullptr,
                     int64_t logits_to_keep = 0) const;

  // The residual stream after the first `num_layers` decoder layers (0 = the token embeddings;
  // num_layers() = the input of the final norm), [B, T, hidden] in float32, for the same inputs as
  // Forward() (no cache). Costs num_layers / num_layers() of a forward pass (no lm_head). Used by
  // the task router (the base model's view of a prompt). TORCH_CHECK on a bad num_layers.
  at::Tensor HiddenStates(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                          int64_t num_layers) const;
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // All linear layers (attention q/k/v/o, MLP gate/up/down per decoder layer), in layer order,
  // e.g. "model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj". lm_head is excluded.
  std::vector<std::string> LinearNames() const;
  // nullptr when absent. "lm_head" is found too (its weight aliases the embedding when tied).
  LinearLayer* FindLinear(const std::string& name);
  const LinearLayer* FindLinear(const std::string& name) const;

  // Every parameter under its HF name (embeddings, norms, linears, lm_head unless tied).
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;
  // The slot holding parameter `name` (an HF tensor name from NamedParameters()), so a caller can
  // replace or train it in place; nullptr when absent. With tied embeddings "lm_head.weight" is
  // not a parameter: replace "model.embed_tokens.weight" and call RetieEmbeddings().
  at::Tensor* FindParameter(const std::string& name);
  // Re-points lm_head at the embedding after the embedding tensor was replaced (tied models).
  void RetieEmbeddings();
  int64_t ParameterCount() const;

  // Shares every tensor with this model; adapters are not copied.
  std::unique_ptr<CausalLM> ShallowCopy() const;

  // Writes config.json + model.safetensors (HF layout) into `dir` (created; files written atomically).
  absl::Status SaveHf(const std::string& dir) const;

  // Removes every adapter.
  void ClearAdapters();

  // Whether Forward() runs a step of one new position per row without a mask, on the CPU in
  // float32 outside autograd, through DecodeStep (decode_step.cc: loops instead of per-layer
  // operators; same results up to summation order). Default: on. Off only to compare the two paths.
  void set_decode_step_enabled(bool enabled) { decode_step_enabled_ = enabled; }
  bool decode_step_enabled() const { return decode_step_enabled_; }
  // The threads a DecodeStep of `rows` rows runs as one team (at::get_num_threads() when it splits
  // every product, side paths included, by rows: one row, float32 weights, adapters none or with
  // low-rank or shared-basis factors); 1 when each product uses the threads itself.
  int DecodeStepTeamSize(int64_t rows) const;

 private:
  struct DecoderLayer {
    at::Tensor input_norm;      // [hidden]
    at::Tensor post_attn_norm;  // [hidden]
    LinearLayer q, k, v, o, gate, up, down;
  };
  CausalLM() = default;
  void InitRope();
  // Embeddings + the first `num_layers` decoder layers (residual stream, compute dtype).
  at::Tensor RunLayers(const at::Tensor& input_ids, const at::Tensor& attention_mask, KVCache* cache,
                       int64_t num_layers) const;
  at::Tensor Attention(const DecoderLayer& layer, size_t index, const at::Tensor& x, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& mask, KVCache* cache) const;
  // The conditions of DecodeStep (see set_decode_step_enabled), checked before each Forward().
  bool CanDecodeStep(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                     const KVCache* cache) const;
  // Logits [B, 1, vocab] for input_ids [B, 1] after the cached positions (decode_step.cc).
  at::Tensor DecodeStep(const at::Tensor& input_ids, KVCache* cache) const;

  ModelConfig config_;
  at::Tensor embed_tokens_;  // [vocab, hidden]
  at::Tensor final_norm_;    // [hidden]
  LinearLayer lm_head_;      // weight aliases embed_tokens_ when tied
  std::vector<DecoderLayer> layers_;
  at::Tensor rope_inv_freq_;  // [head_dim / 2], float32, on the model's device
  bool decode_step_enabled_ = true;
};

}  // namespace strata
