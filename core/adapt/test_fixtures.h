#pragma once
// Test-only fixtures shared by the strata_adapt_tests sources: a tiny Llama model and a learnable
// synthetic task.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <memory>
#include <string>

#include "core/adapt/method_config.h"
#include "core/adapt/trainer.h"
#include "core/model/config.h"
#include "core/model/llama_configs.h"
#include "core/model/model.h"

namespace strata::testing {

// The method config these tests were written with: MethodConfig's defaults before the training
// recipe made the server's defaults the only ones (q/v targets, ELLA λ = 1, φ = 2).
inline MethodConfig QvTestConfig() {
  MethodConfig c;
  c.target_modules = {"q_proj", "v_proj"};
  c.ella_lambda = 1.0;
  c.phi = 2;
  return c;
}

inline ModelConfig TinyConfig() {
  ModelConfig c =
      TiedLlamaConfig(/*hidden=*/16, /*intermediate=*/24, /*layers=*/2, /*heads=*/4, /*kv_heads=*/2,
                      /*vocab=*/32, /*max_positions=*/64);
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
