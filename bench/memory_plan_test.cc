// The memory planner against hand computations and published parameter counts.
#include "bench/memory_plan.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "core/adapt/method.h"
#include "core/model/llama_configs.h"

namespace strata::bench {
namespace {

// A tiny Llama: hidden 16, 2 layers, 4 heads of 4 (2 KV heads), intermediate 24, vocab 32, tied.
ModelConfig Tiny() {
  return TiedLlamaConfig(/*hidden=*/16, /*intermediate=*/24, /*layers=*/2, /*heads=*/4, /*kv_heads=*/2,
                         /*vocab=*/32,
                         /*max_positions=*/2048);
}

MemoryPlanOptions TinyOptions() {
  MemoryPlanOptions o;
  o.dtype = "float32";
  o.device = "cpu";
  o.batch_size = 2;
  o.seq_len = 8;
  o.targets = {"q_proj", "v_proj"};
  o.rank = 2;
  o.k_max = 4;
  o.tasks = 3;
  return o;
}

const MethodMemory& Find(const MemoryPlan& plan, const std::string& name) {
  auto it = std::find_if(plan.methods.begin(), plan.methods.end(),
                         [&](const MethodMemory& m) { return m.method == name; });
  EXPECT_NE(it, plan.methods.end()) << name;
  return *it;
}

TEST(MemoryPlanTest, TinyConfigMatchesHandComputation) {
  auto plan = PlanMemory(Tiny(), TinyOptions());
  ASSERT_TRUE(plan.ok()) << plan.status();
  // Linears per layer: q 16·16, k 8·16, v 8·16, o 16·16, gate/up 24·16, down 16·24 = 1920; ×2 layers
  // = 3840; tied embedding 512; norms 2·2·16 + 16 = 80.
  EXPECT_EQ(plan->parameters, 4432);
  EXPECT_EQ(plan->weight_bytes, 4432 * 4);
  EXPECT_EQ(plan->adapted_parameters, 2 * (256 + 128));
  EXPECT_EQ(plan->kv_bytes_per_token, 2 * 2 * 8 * 4);  // k and v, 2 layers, 2 heads × 4, float32

  const MethodMemory& se = Find(*plan, "share_ella");
  // LoRA on q (n+d = 32) and v (24), rank 2, 2 layers: 224 parameters.
  EXPECT_EQ(se.trainable_parameters, 224);
  EXPECT_EQ(se.trainable_bytes, 224 * 8);   // value + gradient, float32
  EXPECT_EQ(se.optimizer_bytes, 224 * 12);  // exp_avg, exp_avg_sq, denominator
  // Share: k = min(4, 2·3) = 4; bases 4·112, per module 2·4·2·3 coefficients, 4 modules.
  EXPECT_EQ(se.state_bytes, 4 * (4 * 112 + 4 * 48));
  EXPECT_EQ(se.checkpoint_bytes, se.state_bytes + 768 * 4);  // + the served q/v weights
  EXPECT_EQ(se.task_state_bytes, 0);                         // λ = 0
  // Activations: 16 tokens; per token and layer 2h + q + 2kv + 3I = 136, + h (q/v inputs) + 2 adapters
  // × r = 156 floats; probabilities 2·4·8·8 floats per layer, plus 3 such buffers (one layer) in the
  // softmax backward; loss head 4 × 16 × 32 floats.
  const int64_t activations = 2 * 16 * 156 * 4 + 2 * 2 * 4 * 8 * 8 * 4 + 3 * 2 * 4 * 8 * 8 * 4 + 16 * 32 * 16;
  EXPECT_EQ(se.activation_bytes, activations);
  EXPECT_EQ(se.training_peak_bytes, se.state_bytes + 224 * 20 + activations);

  EXPECT_EQ(Find(*plan, "ella").state_bytes, 0);
  EXPECT_EQ(Find(*plan, "share").checkpoint_bytes, se.state_bytes);
  EXPECT_EQ(Find(*plan, "inc_lora").state_bytes, 3 * 224 * 4);
  EXPECT_EQ(Find(*plan, "seq_ft").trainable_parameters, 4432);

  // λ > 0: ELLA keeps a float32 Ŵ_past of the target weights during a task.
  MemoryPlanOptions o = TinyOptions();
  o.ella_lambda = 0.5;
  auto with_penalty = PlanMemory(Tiny(), o, {"share_ella"});
  ASSERT_TRUE(with_penalty.ok());
  EXPECT_EQ(with_penalty->methods.at(0).task_state_bytes, 768 * 4);
}

TEST(MemoryPlanTest, PresetsMatchPublishedParameterCounts) {
  MemoryPlanOptions o;
  auto llama = PresetModelConfig("llama-8b");
  ASSERT_TRUE(llama.ok());
  auto plan = PlanMemory(*llama, o, {"share_ella"});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->parameters, 8030261248);  // Meta-Llama-3-8B
  EXPECT_EQ(plan->weight_bytes, 2 * 8030261248);
  // 32 layers × 8 KV heads × 128 × (k, v) × 2 bytes = 128 KiB per token.
  EXPECT_EQ(plan->kv_bytes_per_token, 131072);
  auto qwen = PresetModelConfig("qwen2-7b");
  ASSERT_TRUE(qwen.ok());
  EXPECT_EQ(PlanMemory(*qwen, o, {"ella"})->parameters, 7615616512);  // Qwen2-7B (with q/k/v biases)
  auto mistral = PresetModelConfig("mistral-7b");
  ASSERT_TRUE(mistral.ok());
  EXPECT_EQ(PlanMemory(*mistral, o, {"ella"})->parameters, 7248023552);  // Mistral-7B-v0.3
  EXPECT_FALSE(PresetModelConfig("llama-70b").ok());
}

TEST(MemoryPlanTest, EveryMethodIsPlannedAndBadOptionsAreRefused) {
  auto plan = PlanMemory(Tiny(), TinyOptions());
  ASSERT_TRUE(plan.ok());
  std::vector<std::string> names;
  for (const auto& m : plan->methods) names.push_back(m.method);
  EXPECT_EQ(names, MethodNames());
  MemoryPlanOptions o = TinyOptions();
  o.dtype = "int8";
  EXPECT_EQ(PlanMemory(Tiny(), o).status().code(), absl::StatusCode::kInvalidArgument);
  o = TinyOptions();
  o.targets = {"c_attn"};
  EXPECT_NE(PlanMemory(Tiny(), o).status().message().find("c_attn"), std::string::npos);
  o = TinyOptions();
  o.batch_size = 0;
  EXPECT_FALSE(PlanMemory(Tiny(), o).ok());
  EXPECT_FALSE(PlanMemory(Tiny(), TinyOptions(), {"lora"}).ok());
}

}  // namespace
}  // namespace strata::bench
