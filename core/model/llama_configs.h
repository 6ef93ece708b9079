#pragma once
// The Llama shapes Strata builds itself (the embedded default model, the benchmarks' 110M config,
// the test models): one constructor so their common fields are written once.

#include <cstdint>

#include "core/model/config.h"

namespace strata {

// LlamaForCausalLM with tied embeddings, head_dim = hidden / heads, RMSNorm eps 1e-5, BOS 1, EOS 2.
inline ModelConfig TiedLlamaConfig(int64_t hidden, int64_t intermediate, int64_t layers, int64_t heads,
                                   int64_t kv_heads, int64_t vocab, int64_t max_positions) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = max_positions;
  c.vocab_size = vocab;
  c.tie_word_embeddings = true;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

}  // namespace strata
