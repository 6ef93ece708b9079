#pragma once
// Test-only fixtures shared by the strata_adapt_tests sources: a tiny Llama model and a learnable
// synthetic task.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <memory>
#include <string>

#include "core/adapt/trainer.h"
#include "core/model/config.h"
#include "core/model/model.h"

namespace strata::testing {

inline ModelConfig TinyConfig() {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 64;
  c.vocab_size = 32;
  c.tie_word_embeddings = true;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.torch_dtype = "float32";
  return c;
}

// RandomInit's embeddings (std 0.02) bound the tied logits to about ±0.3, which LoRA on the linear
// layers cannot change; std 0.5 lets adapter training reach confident predictions.
inline std::unique_ptr<CausalLM> TinyModel() {
  auto m = CausalLM::RandomInit(TinyConfig(), 3);
  EXPECT_TRUE(m.ok()) << m.status();
  at::Tensor* embed = (*m)->FindParameter("model.embed_tokens.weight");
  *embed = embed->mul(25.0);
  (*m)->RetieEmbeddings();
  return std::move(m).value();
}

// A learnable synthetic task: [BOS, x, (filler), y, 20 + (y + offset) % 8] with the last token as
// the target (a bigram the tiny model can learn), of variable length so batches are padded.
inline TrainTask SyntheticTask(const std::string& name, int offset, int n) {
  TrainTask task;
  task.name = name;
  for (int i = 0; i < n; ++i) {
    EncodedExample e;
    const int x = 3 + (i % 5);
    const int y = 10 + (i % 8);
    e.ids.push_back(1);
    e.ids.push_back(x);
    if (i % 3 == 0) e.ids.push_back(17);
    e.ids.push_back(y);
    e.ids.push_back(20 + (y + offset) % 8);
    e.target_start = static_cast<int32_t>(e.ids.size()) - 1;
    task.examples.push_back(e);
  }
  return task;
}

}  // namespace strata::testing
