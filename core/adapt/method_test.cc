// Tests of the Method interface and the methods, driven by hand (no trainer): adapters at step 0,
// penalties, merges into served weights, state export/import, routing, aborts.
#include "core/adapt/method.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <set>

#include "core/adapt/ella.h"
#include "core/adapt/lora.h"
#include "core/adapt/methods.h"
#include "core/adapt/test_fixtures.h"

namespace strata {
namespace {

using ::testing::HasSubstr;

using testing::TinyConfig;

// The plain RandomInit model (test_fixtures.h's TinyModel rescales the embeddings).
std::unique_ptr<CausalLM> TinyModel(uint64_t seed = 7) {
  auto m = CausalLM::RandomInit(TinyConfig(), seed);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

at::Tensor Ids() {
  return at::tensor(std::vector<int64_t>{1, 5, 9, 3, 17, 30, 4, 8, 1, 22, 11, 2, 6, 7, 19, 25}).view({2, 8});
}

at::Tensor Logits(const CausalLM& m) {
  at::NoGradGuard g;
  return m.Forward(Ids(), at::Tensor());
}

double MaxDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.detach().to(at::kDouble) - b.detach().to(at::kDouble)).abs().max().item<double>();
}

// Moves every trainable tensor away from its init so that the task's update is non-zero.
void Perturb(const Method& method, uint64_t seed) {
  at::NoGradGuard g;
  at::Generator gen = at::detail::createCPUGenerator(seed);
  for (auto& [name, p] : method.TrainableParameters()) {
    p.add_(at::randn(p.sizes(), gen, at::TensorOptions().dtype(p.scalar_type())).mul(0.05));
  }
}

at::Tensor ActiveDelta(CausalLM& model, const std::string& module) {
  auto* adapter = dynamic_cast<LowRankAdapter*>(model.FindLinear(module)->adapter.get());
  EXPECT_NE(adapter, nullptr) << module;
  at::NoGradGuard g;
  return adapter->DeltaWeight().detach().clone();
}

MethodConfig SmallConfig() {
  MethodConfig c = testing::QvTestConfig();
  c.rank = 2;
  c.p = 2;
  c.phi = 1;
  c.k_max = 4;
  c.alpha = 4.0;
  c.ella_lambda = 0.7;
  return c;
}

std::unique_ptr<Method> MakeMethod(const std::string& name, MethodConfig config = SmallConfig()) {
  auto m = CreateMethod(name, config);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

// Runs one task by hand: BeginTask on a copy of `served`, Perturb, EndTask. Returns the new served
// model; `deltas` (if given) receives the active ΔW per module before the merge.
std::unique_ptr<CausalLM> RunTask(Method& method, const CausalLM& served, const std::string& task,
                                  uint64_t seed, std::map<std::string, at::Tensor>* deltas = nullptr) {
  auto work = served.ShallowCopy();
  absl::Status s = method.BeginTask(task, work.get());
  EXPECT_TRUE(s.ok()) << s;
  Perturb(method, seed);
  if (deltas != nullptr) {
    for (const auto& m : method.modules()) (*deltas)[m] = ActiveDelta(*work, m);
  }
  s = method.EndTask(work.get());
  EXPECT_TRUE(s.ok()) << s;
  return work;
}

// ---- factory and config --------------------------------------------------------------------------

TEST(MethodFactoryTest, KnownAndUnknownNames) {
  for (const std::string& name : MethodNames()) {
    auto m = CreateMethod(name, MethodConfig{});
    ASSERT_TRUE(m.ok()) << name << ": " << m.status();
    EXPECT_EQ((*m)->name(), name);
  }
  EXPECT_EQ(MethodNames().front(), kDefaultMethod);
  auto bad = CreateMethod("lora_magic", MethodConfig{});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* valid :
       {"share_ella", "share", "ella", "seq_lora", "inc_lora", "o_lora", "seq_ft", "mtl"}) {
    EXPECT_THAT(std::string(bad.status().message()), HasSubstr(valid));
  }
  EXPECT_TRUE((*CreateMethod("mtl", MethodConfig{}))->joint());
  EXPECT_FALSE((*CreateMethod("seq_lora", MethodConfig{}))->joint());
}

TEST(MethodFactoryTest, ConfigValidationAndJson) {
  MethodConfig c;
  c.rank = 0;
  auto m = CreateMethod("seq_lora", c);
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("rank"));
  c = MethodConfig{};
  c.mtl_shape = "tiny";
  EXPECT_THAT(std::string(CreateMethod("mtl", c).status().message()), HasSubstr("mtl_shape"));

  MethodConfig d;
  d.target_modules = {"all-linear"};
  d.rank = 4;
  d.alpha = 8;
  d.ella_lambda = 0.25;
  d.olora_lambda = 0.1;
  d.k_max = 16;
  d.phi = 3;
  d.p = 6;
  d.energy_threshold = 0.99;
  d.ft_scope = "target";
  d.mtl_shape = "lora";
  d.seed = 42;
  auto back = MethodConfigFromJson(MethodConfigToJson(d));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(MethodConfigToJson(*back), MethodConfigToJson(d));
  EXPECT_EQ(back->target_modules, d.target_modules);
  EXPECT_EQ(back->seed, 42u);

  auto partial = MethodConfigFromJson(R"({"rank": 16, "target_modules": "all-linear"})");
  ASSERT_TRUE(partial.ok()) << partial.status();
  EXPECT_EQ(partial->rank, 16);
  EXPECT_EQ(partial->target_modules, std::vector<std::string>{"all-linear"});
  EXPECT_EQ(partial->alpha, 16.0);
  auto unknown = MethodConfigFromJson(R"({"rnak": 16})");
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("rnak"));
  EXPECT_FALSE(MethodConfigFromJson(R"({"rank": "x"})").ok());
  EXPECT_FALSE(MethodConfigFromJson("not json").ok());
}

TEST(MethodFactoryTest, ResolveTargetModules) {
  auto model = TinyModel();
  auto qv = ResolveTargetModules(*model, {"q_proj", "v_proj"});
  ASSERT_TRUE(qv.ok());
  EXPECT_EQ(*qv,
            (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                      "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}));
  auto all = ResolveTargetModules(*model, {"all-linear"});
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 14u);
  EXPECT_EQ(*all, model->LinearNames());
  auto one = ResolveTargetModules(*model, {"model.layers.1.mlp.down_proj"});
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->size(), 1u);
  auto bad = ResolveTargetModules(*model, {"c_attn"});
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("gate_proj"));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("all-linear"));
}

// ---- LoRA adapter ----------------------------------------------------------------------------------

TEST(LoraTest, ZeroBReproducesBaseAndSidePathEqualsMergedWeight) {
  auto model = TinyModel();
  const at::Tensor base = Logits(*model);
  const std::string name = "model.layers.1.self_attn.v_proj";
  LinearLayer* layer = model->FindLinear(name);
  auto adapter = LoraAdapter::Create(layer->weight.size(1), layer->weight.size(0), 4, 8.0, 3, at::kFloat,
                                     at::Device(at::kCPU));
  EXPECT_EQ(adapter->scaling(), 2.0);
  EXPECT_EQ(adapter->b().abs().sum().item<double>(), 0.0);
  const double bound = 1.0 / std::sqrt(static_cast<double>(layer->weight.size(1)));
  EXPECT_LE(adapter->a().abs().max().item<double>(), bound);
  EXPECT_GT(adapter->a().abs().max().item<double>(), 0.5 * bound);
  layer->adapter = adapter;
  EXPECT_EQ(MaxDiff(Logits(*model), base), 0.0);

  {
    at::NoGradGuard g;
    adapter->b().copy_(at::randn(adapter->b().sizes()));
  }
  const at::Tensor with_adapter = Logits(*model);
  EXPECT_GT(MaxDiff(with_adapter, base), 1e-4);
  auto merged = model->ShallowCopy();
  merged->FindLinear(name)->weight = layer->weight + adapter->DeltaWeight().detach();
  EXPECT_LT(MaxDiff(Logits(*merged), with_adapter), 1e-5);

  // Same seed, same init; another seed differs.
  auto again = LoraAdapter::Create(layer->weight.size(1), layer->weight.size(0), 4, 8.0, 3, at::kFloat,
                                   at::Device(at::kCPU));
  EXPECT_TRUE(at::equal(again->a(), adapter->a()));
  auto other = LoraAdapter::Create(layer->weight.size(1), layer->weight.size(0), 4, 8.0, 4, at::kFloat,
                                   at::Device(at::kCPU));
  EXPECT_FALSE(at::equal(other->a(), adapter->a()));
}

TEST(MethodTest, EveryAdapterMethodStartsAtTheServedModel) {
  auto base = TinyModel();
  const at::Tensor base_logits = Logits(*base);
  MethodConfig config = SmallConfig();
  config.target_modules = {"all-linear"};
  for (const std::string name : {"seq_lora", "inc_lora", "o_lora", "ella", "share", "share_ella", "mtl"}) {
    MethodConfig c = config;
    if (name == "mtl") c.mtl_shape = "lora";
    auto method = MakeMethod(name, c);
    // Task 1 from the base model.
    auto work = base->ShallowCopy();
    ASSERT_TRUE(method->BeginTask("a", work.get()).ok()) << name;
    EXPECT_EQ(method->modules().size(), 14u);
    EXPECT_FALSE(method->TrainableParameters().empty());
    for (auto& [pname, p] : method->TrainableParameters()) {
      EXPECT_TRUE(p.requires_grad()) << name << " " << pname;
      EXPECT_TRUE(p.is_leaf()) << name << " " << pname;
    }
    EXPECT_EQ(MaxDiff(Logits(*work), base_logits), 0.0) << name;
    Perturb(*method, 1);
    EXPECT_GT(MaxDiff(Logits(*work), base_logits), 1e-5) << name;
    ASSERT_TRUE(method->EndTask(work.get()).ok()) << name;
    const at::Tensor served_logits = Logits(*work);
    EXPECT_GT(MaxDiff(served_logits, base_logits), 1e-5) << name;
    // Task 2 starts at the served model of task 1 (for seq_lora: the same LoRA, continued).
    auto work2 = work->ShallowCopy();
    ASSERT_TRUE(method->BeginTask("b", work2.get()).ok()) << name;
    EXPECT_LT(MaxDiff(Logits(*work2), served_logits), 1e-5) << name;
    method->AbortTask(work2.get());
  }
}

// ---- ELLA penalty ----------------------------------------------------------------------------------

TEST(MethodTest, EllaPenaltyIsZeroAtFirstTaskAndMatchesHandComputation) {
  for (const std::string name : {"ella", "share_ella"}) {
    auto base = TinyModel();
    auto method = MakeMethod(name);
    auto work = base->ShallowCopy();
    ASSERT_TRUE(method->BeginTask("t1", work.get()).ok());
    Perturb(*method, 11);  // ΔW_1 ≠ 0, but W_past = 0: no penalty
    at::Tensor p1 = method->ExtraLoss();
    EXPECT_TRUE(!p1.defined() || p1.item<double>() == 0.0) << name;
    std::map<std::string, at::Tensor> past;
    for (const auto& m : method->modules()) past[m] = ActiveDelta(*work, m);
    ASSERT_TRUE(method->EndTask(work.get()).ok());

    auto work2 = work->ShallowCopy();
    ASSERT_TRUE(method->BeginTask("t2", work2.get()).ok());
    at::Tensor p2_start = method->ExtraLoss();  // ΔW_2 = 0 at step 0
    EXPECT_TRUE(!p2_start.defined() || p2_start.item<double>() == 0.0) << name;
    Perturb(*method, 12);
    at::Tensor p2 = method->ExtraLoss();
    ASSERT_TRUE(p2.defined()) << name;
    double expected = 0;
    for (const auto& m : method->modules()) {
      const at::Tensor w = past[m].to(at::kDouble);
      const double rms = w.square().mean().sqrt().item<double>();
      const at::Tensor d = ActiveDelta(*work2, m).to(at::kDouble);
      expected += 0.7 * (d * (w / rms)).square().sum().item<double>();
    }
    EXPECT_GT(expected, 0.0);
    EXPECT_NEAR(p2.item<double>(), expected, 1e-4 * expected) << name;
    // The penalty has gradients on the trainable tensors.
    p2.backward();
    double grad = 0;
    for (auto& [pname, p] : method->TrainableParameters()) {
      if (p.grad().defined()) grad += p.grad().abs().sum().item<double>();
    }
    EXPECT_GT(grad, 0.0) << name;
    method->AbortTask(work2.get());
  }
}

TEST(MethodTest, OLoraOrthogonalityTerm) {
  auto base = TinyModel();
  auto method = MakeMethod("o_lora");
  auto work = base->ShallowCopy();
  ASSERT_TRUE(method->BeginTask("t1", work.get()).ok());
  EXPECT_FALSE(method->ExtraLoss().defined());
  std::map<std::string, at::Tensor> a1;
  for (auto& [pname, p] : method->TrainableParameters()) a1[pname] = p.detach().clone();
  ASSERT_TRUE(method->EndTask(work.get()).ok());
  auto work2 = work->ShallowCopy();
  ASSERT_TRUE(method->BeginTask("t2", work2.get()).ok());
  double expected = 0;
  for (auto& [pname, p] : method->TrainableParameters()) {
    if (pname.size() > 6 && pname.substr(pname.size() - 6) == "lora_A") {
      expected += at::matmul(a1[pname], p.detach().t()).abs().sum().item<double>();
    }
  }
  at::Tensor loss = method->ExtraLoss();
  ASSERT_TRUE(loss.defined());
  EXPECT_GT(expected, 0.0);
  EXPECT_NEAR(loss.item<double>(), 0.5 * expected, 1e-5 * expected);
  method->AbortTask(work2.get());
}

// ---- served weights ------------------------------------------------------------------------------------

// Served weights of inc_lora / o_lora / ella / share_ella are W0 + Σ merged ΔW_t; seq_lora serves
// W0 + the last LoRA (it continues across tasks).
TEST(MethodTest, ServedWeightsAreBasePlusMergedUpdates) {
  for (const std::string name : {"inc_lora", "o_lora", "ella", "share_ella", "seq_lora"}) {
    auto base = TinyModel();
    auto method = MakeMethod(name);
    std::unique_ptr<CausalLM> served = base->ShallowCopy();
    std::map<std::string, at::Tensor> sum, last;
    for (int t = 0; t < 3; ++t) {
      std::map<std::string, at::Tensor> deltas;
      served = RunTask(*method, *served, "task" + std::to_string(t), 100 + t, &deltas);
      for (auto& [m, d] : deltas) sum[m] = sum.count(m) ? sum[m] + d : d;
      last = deltas;
    }
    ASSERT_EQ(method->num_tasks(), 3);
    const auto& expected = name == "seq_lora" ? last : sum;
    for (const auto& m : method->modules()) {
      const LinearLayer* layer = served->FindLinear(m);
      EXPECT_EQ(layer->adapter, nullptr) << name;  // merged into the weights, no side path
      EXPECT_LT(MaxDiff(layer->weight, base->FindLinear(m)->weight + expected.at(m)), 2e-6)
          << name << " " << m;
      EXPECT_GT(expected.at(m).abs().max().item<double>(), 1e-4) << name;
    }
    // Non-target layers are the base tensors themselves.
    EXPECT_TRUE(served->FindLinear("model.layers.0.self_attn.k_proj")
                    ->weight.is_same(base->FindLinear("model.layers.0.self_attn.k_proj")->weight));
    // Rebuilding from the base weights gives the same served model.
    auto rebuilt = base->ShallowCopy();
    ASSERT_TRUE(method->ApplyServedWeights(rebuilt.get()).ok());
    EXPECT_LT(MaxDiff(Logits(*rebuilt), Logits(*served)), 1e-5) << name;
    // The base model was never written.
    EXPECT_EQ(MaxDiff(Logits(*base), Logits(*TinyModel())), 0.0);
  }
}

TEST(MethodTest, ShareServesReconstructedTaskUpdatesAndRoutes) {
  auto base = TinyModel();
  MethodConfig config = SmallConfig();
  config.k_max = 64;  // nothing truncated: reconstructions exact
  config.energy_threshold = 1.0;
  for (const std::string training : {"lora", "subspace"})
    for (const std::string name : {"share", "share_ella"}) {
      SCOPED_TRACE(name + " trained as " + training);
      config.share_training = training;
      auto method = MakeMethod(name, config);
      // "lora" trains a plain LoRA (lora_A, lora_B); "subspace" the coefficients and temporary vectors.
      {
        auto work = base->ShallowCopy();
        ASSERT_TRUE(method->BeginTask("probe", work.get()).ok());
        EXPECT_THAT(method->TrainableParameters().front().first,
                    HasSubstr(training == "lora" ? ".lora_A" : ".r_beta1"));
        method->AbortTask(work.get());
      }
      std::unique_ptr<CausalLM> served = base->ShallowCopy();
      std::map<std::string, std::map<std::string, at::Tensor>> per_task;
      for (int t = 0; t < 2; ++t) {
        served = RunTask(*method, *served, "task" + std::to_string(t), 300 + t,
                         &per_task["task" + std::to_string(t)]);
      }
      ASSERT_TRUE(method->SupportsTaskRouting());
      for (const auto& m : method->modules()) {
        const at::Tensor expected = base->FindLinear(m)->weight + per_task["task0"][m] + per_task["task1"][m];
        EXPECT_LT(MaxDiff(served->FindLinear(m)->weight, expected), 1e-5) << name << " " << m;
      }
      // Routing to task 0: W0 + ΔW_0 as a side path.
      auto routed = base->ShallowCopy();
      ASSERT_TRUE(method->ApplyTaskRouting("task0", routed.get()).ok());
      auto merged0 = base->ShallowCopy();
      for (const auto& m : method->modules()) {
        EXPECT_NE(routed->FindLinear(m)->adapter, nullptr);
        merged0->FindLinear(m)->weight = base->FindLinear(m)->weight + per_task["task0"][m];
      }
      EXPECT_LT(MaxDiff(Logits(*routed), Logits(*merged0)), 1e-4) << name;
      // Routing to task 1: the model as of task 1, W0 + ΔW_0 + ΔW_1 (here: the served weights), as
      // one side path of rank k.
      auto routed1 = base->ShallowCopy();
      ASSERT_TRUE(method->ApplyTaskRouting("task1", routed1.get()).ok());
      for (const auto& m : method->modules()) {
        ASSERT_NE(routed1->FindLinear(m)->adapter, nullptr);
      }
      EXPECT_LT(MaxDiff(Logits(*routed1), Logits(*served)), 1e-4) << name;
      EXPECT_GT(MaxDiff(Logits(*routed1), Logits(*merged0)), 1e-3) << name;
      EXPECT_EQ(method->ApplyTaskRouting("nope", base->ShallowCopy().get()).code(),
                absl::StatusCode::kNotFound);
    }
  auto ella = MakeMethod("ella");
  EXPECT_FALSE(ella->SupportsTaskRouting());
  EXPECT_EQ(ella->ApplyTaskRouting("x", base.get()).code(), absl::StatusCode::kUnimplemented);
}

TEST(MethodTest, IncLoraRoutesToTheModelAsOfATask) {
  auto base = TinyModel();
  auto method = MakeMethod("inc_lora");
  std::unique_ptr<CausalLM> served = base->ShallowCopy();
  std::map<std::string, at::Tensor> d0, d1, d2;
  served = RunTask(*method, *served, "a", 1, &d0);
  served = RunTask(*method, *served, "b", 2, &d1);
  served = RunTask(*method, *served, "c", 3, &d2);
  // "b": W0 + ΔW_a + ΔW_b (the model it trained on plus its own update), without "c".
  auto routed = base->ShallowCopy();
  ASSERT_TRUE(method->ApplyTaskRouting("b", routed.get()).ok());
  auto as_of_b = base->ShallowCopy();
  for (const auto& m : method->modules()) {
    as_of_b->FindLinear(m)->weight = base->FindLinear(m)->weight + d0[m] + d1[m];
  }
  EXPECT_LT(MaxDiff(Logits(*routed), Logits(*as_of_b)), 1e-5);
  EXPECT_GT(MaxDiff(Logits(*routed), Logits(*served)), 1e-3);
  auto routed_last = base->ShallowCopy();
  ASSERT_TRUE(method->ApplyTaskRouting("c", routed_last.get()).ok());
  EXPECT_LT(MaxDiff(Logits(*routed_last), Logits(*served)), 1e-5);
}

TEST(MethodTest, SeqFtTrainsCopiesAndKeepsTheServedModel) {
  auto base = TinyModel();
  const at::Tensor before = Logits(*base);
  auto method = MakeMethod("seq_ft");
  auto work = base->ShallowCopy();
  ASSERT_TRUE(method->BeginTask("t", work.get()).ok());
  // Every parameter (tied embedding included) is trainable.
  EXPECT_EQ(method->TrainableParameters().size(), base->NamedParameters().size());
  Perturb(*method, 5);  // in place on the working copy's tensors
  EXPECT_EQ(MaxDiff(Logits(*base), before), 0.0);
  const at::Tensor trained = Logits(*work);
  EXPECT_GT(MaxDiff(trained, before), 1e-4);
  ASSERT_TRUE(method->EndTask(work.get()).ok());
  EXPECT_EQ(MaxDiff(Logits(*work), trained), 0.0);
  EXPECT_FALSE(work->FindLinear("model.layers.0.self_attn.q_proj")->weight.requires_grad());
  auto rebuilt = base->ShallowCopy();
  ASSERT_TRUE(method->ApplyServedWeights(rebuilt.get()).ok());
  EXPECT_EQ(MaxDiff(Logits(*rebuilt), trained), 0.0);

  MethodConfig target = SmallConfig();
  target.ft_scope = "target";
  auto method2 = MakeMethod("seq_ft", target);
  auto work2 = base->ShallowCopy();
  ASSERT_TRUE(method2->BeginTask("t", work2.get()).ok());
  EXPECT_EQ(method2->TrainableParameters().size(), 4u);  // q, v of 2 layers
  method2->AbortTask(work2.get());
}

// ---- state -----------------------------------------------------------------------------------------------

TEST(MethodTest, StateRoundTripsForEveryMethod) {
  auto base = TinyModel();
  for (const std::string& name : MethodNames()) {
    MethodConfig config = SmallConfig();
    config.target_modules = {"q_proj", "o_proj"};
    auto method = MakeMethod(name, config);
    std::unique_ptr<CausalLM> served = base->ShallowCopy();
    served = RunTask(*method, *served, "first", 21);
    served = RunTask(*method, *served, "second", 22);
    auto state = method->ExportState();
    ASSERT_TRUE(state.ok()) << name << ": " << state.status();
    EXPECT_EQ(state->method, name);
    EXPECT_FALSE(state->tensors.empty()) << name;
    for (auto& [k, t] : state->tensors) EXPECT_TRUE(t.is_contiguous() && t.device().is_cpu()) << k;

    auto restored = CreateMethodFromState(*state);
    ASSERT_TRUE(restored.ok()) << name << ": " << restored.status();
    EXPECT_EQ((*restored)->tasks(), method->tasks());
    EXPECT_EQ((*restored)->modules(), method->modules());
    EXPECT_EQ(MethodConfigToJson((*restored)->config()), MethodConfigToJson(method->config()));
    auto again = (*restored)->ExportState();
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->config_json, state->config_json) << name;
    ASSERT_EQ(again->tensors.size(), state->tensors.size()) << name;
    for (auto& [k, t] : state->tensors) {
      ASSERT_TRUE(again->tensors.count(k)) << name << " " << k;
      EXPECT_TRUE(at::equal(again->tensors.at(k), t)) << name << " " << k;
    }
    // Same served model from the restored state.
    auto rebuilt = base->ShallowCopy();
    ASSERT_TRUE((*restored)->ApplyServedWeights(rebuilt.get()).ok()) << name;
    EXPECT_LT(MaxDiff(Logits(*rebuilt), Logits(*served)), 1e-5) << name;
    // The restored method continues: a third task starts at the served model.
    auto work = served->ShallowCopy();
    ASSERT_TRUE((*restored)->BeginTask("third", work.get()).ok()) << name;
    EXPECT_LT(MaxDiff(Logits(*work), Logits(*served)), 1e-5) << name;
    (*restored)->AbortTask(work.get());

    // A state is refused by another method, and a broken one leaves the method unchanged.
    auto other = MakeMethod(name == "seq_lora" ? "inc_lora" : "seq_lora", config);
    EXPECT_FALSE(other->ImportState(*state).ok());
    MethodState broken = *state;
    broken.tensors.erase(broken.tensors.begin());
    if (name != "seq_ft" && name != "mtl") {  // full fine-tuning stores any subset of parameters
      EXPECT_FALSE((*restored)->ImportState(broken).ok()) << name;
      EXPECT_EQ((*restored)->num_tasks(), 2);
    }
  }
}

TEST(MethodTest, AbortAndTaskLifecycleErrors) {
  auto base = TinyModel();
  for (const std::string& name : MethodNames()) {
    auto method = MakeMethod(name);
    std::unique_ptr<CausalLM> served = RunTask(*method, *base, "one", 1);
    auto before = method->ExportState();
    ASSERT_TRUE(before.ok());
    auto work = served->ShallowCopy();
    EXPECT_EQ(method->BeginTask("one", work.get()).code(), absl::StatusCode::kAlreadyExists) << name;
    ASSERT_TRUE(method->BeginTask("two", work.get()).ok()) << name;
    EXPECT_EQ(method->BeginTask("three", work.get()).code(), absl::StatusCode::kFailedPrecondition) << name;
    EXPECT_EQ(method->ExportState().status().code(), absl::StatusCode::kFailedPrecondition) << name;
    Perturb(*method, 9);
    method->AbortTask(work.get());
    EXPECT_FALSE(method->task_active());
    auto after = method->ExportState();
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(after->config_json, before->config_json) << name;
    for (auto& [k, t] : before->tensors) EXPECT_TRUE(at::equal(after->tensors.at(k), t)) << name << " " << k;
    EXPECT_EQ(method->EndTask(work.get()).code(), absl::StatusCode::kFailedPrecondition);
  }
  // Unknown target modules are refused at BeginTask.
  MethodConfig config = testing::QvTestConfig();
  config.target_modules = {"c_attn"};
  auto method = MakeMethod("seq_lora", config);
  auto work = base->ShallowCopy();
  absl::Status s = method->BeginTask("x", work.get());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("c_attn"));
}

// ---- ELLA state without a dense W_past --------------------------------------------------------------

// Bytes of the state's storages that the served model does not hold.
int64_t UnsharedBytes(const MethodState& state, const CausalLM& served) {
  std::set<const void*> model;
  for (const auto& [name, t] : served.NamedParameters()) model.insert(t.storage().data());
  for (const auto& m : served.LinearNames()) model.insert(served.FindLinear(m)->weight.storage().data());
  std::set<const void*> seen;
  int64_t bytes = 0;
  for (const auto& [k, t] : state.tensors) {
    const void* p = t.storage().data();
    if (model.count(p) || !seen.insert(p).second) continue;
    bytes += static_cast<int64_t>(t.storage().nbytes());
  }
  return bytes;
}

// ella / share_ella keep a handle to the served weights instead of a dense float32 W_past: the state
// beyond the served model is Share's alone, the served model is W0 + Σ ΔW_t, and it survives a state
// round trip exactly.
TEST(MethodTest, EllaStateSharesTheServedWeightsAndRoundTripsExactly) {
  auto base = TinyModel();
  for (const std::string name : {"share_ella", "ella"}) {
    MethodConfig config = SmallConfig();
    config.target_modules = {"all-linear"};
    config.ella_lambda = 0.0;
    auto method = MakeMethod(name, config);
    std::unique_ptr<CausalLM> served = base->ShallowCopy();
    std::map<std::string, at::Tensor> sum;
    for (int t = 0; t < 3; ++t) {
      std::map<std::string, at::Tensor> deltas;
      served = RunTask(*method, *served, "task" + std::to_string(t), 40 + t, &deltas);
      for (auto& [m, d] : deltas) sum[m] = sum.count(m) ? sum[m] + d : d;
    }
    auto state = method->ExportState();
    ASSERT_TRUE(state.ok()) << state.status();
    int64_t share_bytes = 0;
    for (const auto& [k, t] : state->tensors) {
      EXPECT_NE(k.rfind("ella/", 0), 0u) << name << ": dense W_past exported: " << k;
      if (k.rfind("share/", 0) == 0) share_bytes += t.numel() * static_cast<int64_t>(t.element_size());
    }
    for (const auto& m : method->modules()) {
      ASSERT_TRUE(state->tensors.count("served/" + m)) << name << " " << m;
      const at::Tensor& w = state->tensors.at("served/" + m);
      // The served model's own tensor: no copy.
      EXPECT_EQ(w.storage().data(), served->FindLinear(m)->weight.storage().data()) << name << " " << m;
      EXPECT_LT(MaxDiff(w, base->FindLinear(m)->weight + sum.at(m)), 2e-6) << name << " " << m;
    }
    EXPECT_EQ(UnsharedBytes(*state, *served), share_bytes) << name;
    if (name == "ella") {
      EXPECT_EQ(share_bytes, 0);
    }

    auto restored = CreateMethodFromState(*state);
    ASSERT_TRUE(restored.ok()) << restored.status();
    auto rebuilt = base->ShallowCopy();
    ASSERT_TRUE((*restored)->ApplyServedWeights(rebuilt.get()).ok());
    for (const auto& m : method->modules()) {
      EXPECT_TRUE(at::equal(rebuilt->FindLinear(m)->weight, served->FindLinear(m)->weight))
          << name << " " << m;
    }
    EXPECT_TRUE(at::equal(Logits(*rebuilt), Logits(*served))) << name;
  }
}

// A bf16 model: the served weights (and so the state and a checkpoint) stay bf16, the adapters fp32.
TEST(MethodTest, EllaStateKeepsTheModelDtype) {
  ModelLoadOptions lo;
  lo.dtype = "bfloat16";
  auto base = CausalLM::RandomInit(TinyConfig(), 7, lo);
  ASSERT_TRUE(base.ok()) << base.status();
  auto method = MakeMethod("share_ella");
  std::unique_ptr<CausalLM> served = (*base)->ShallowCopy();
  served = RunTask(*method, *served, "a", 1);
  auto work = served->ShallowCopy();
  ASSERT_TRUE(method->BeginTask("b", work.get()).ok());
  for (auto& [pname, p] : method->TrainableParameters()) EXPECT_EQ(p.scalar_type(), at::kFloat) << pname;
  Perturb(*method, 2);
  EXPECT_TRUE(method->ExtraLoss().defined());  // λ = 0.7 on W_served − W0 of a bf16 model
  ASSERT_TRUE(method->EndTask(work.get()).ok());
  served = std::move(work);
  auto state = method->ExportState();
  ASSERT_TRUE(state.ok());
  int64_t served_bytes = 0;
  for (const auto& m : method->modules()) {
    const at::Tensor& w = state->tensors.at("served/" + m);
    EXPECT_EQ(w.scalar_type(), at::kBFloat16) << m;
    served_bytes += w.numel() * 2;
    EXPECT_GT(MaxDiff(w, (*base)->FindLinear(m)->weight), 0.0) << m;
  }
  EXPECT_EQ(served_bytes, 2 * 2 * (16 * 16 + 8 * 16));  // q and v of 2 layers, 2 bytes each
  auto restored = CreateMethodFromState(*state);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto rebuilt = (*base)->ShallowCopy();
  ASSERT_TRUE((*restored)->ApplyServedWeights(rebuilt.get()).ok());
  EXPECT_TRUE(at::equal(Logits(*rebuilt), Logits(*served)));
}

// With λ > 0 the penalty derives W_past = W_served − W0: a restored method needs W0, which
// ApplyServedWeights(base) provides; the penalty then equals the original method's.
TEST(MethodTest, EllaPenaltyAfterRestoreNeedsTheBaseAndMatches) {
  auto base = TinyModel();
  auto method = MakeMethod("share_ella");  // λ = 0.7
  std::unique_ptr<CausalLM> served = base->ShallowCopy();
  served = RunTask(*method, *served, "a", 31);
  served = RunTask(*method, *served, "b", 32);
  auto state = method->ExportState();
  ASSERT_TRUE(state.ok());

  auto work = served->ShallowCopy();
  ASSERT_TRUE(method->BeginTask("c", work.get()).ok());
  Perturb(*method, 33);
  const double expected = method->ExtraLoss().item<double>();
  EXPECT_GT(expected, 0.0);
  method->AbortTask(work.get());

  auto restored = CreateMethodFromState(*state);
  ASSERT_TRUE(restored.ok());
  auto work2 = served->ShallowCopy();
  absl::Status s = (*restored)->BeginTask("c", work2.get());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("ApplyServedWeights"));
  EXPECT_FALSE((*restored)->task_active());
  auto rebuilt = base->ShallowCopy();
  ASSERT_TRUE((*restored)->ApplyServedWeights(rebuilt.get()).ok());
  work2 = served->ShallowCopy();
  ASSERT_TRUE((*restored)->BeginTask("c", work2.get()).ok());
  Perturb(**restored, 33);
  EXPECT_NEAR((*restored)->ExtraLoss().item<double>(), expected, 1e-5 * expected);
  (*restored)->AbortTask(work2.get());
}

// A state written before the served-weights form (strata.ella.v1: a dense float32 W_past per module)
// still loads and serves W0 + W_past; the next task rewrites it in the new form.
TEST(MethodTest, LegacyEllaV1StateLoadsAndIsRewrittenByTheNextTask) {
  auto base = TinyModel();
  auto method = MakeMethod("share_ella");
  std::unique_ptr<CausalLM> served = base->ShallowCopy();
  served = RunTask(*method, *served, "a", 51);
  served = RunTask(*method, *served, "b", 52);
  auto state = method->ExportState();
  ASSERT_TRUE(state.ok());
  // Rewrite it as a v1 state: ella/<m>/w_past = W_served − W0 and the per-module ELLA configs.
  MethodState v1 = *state;
  nlohmann::json j = nlohmann::json::parse(v1.config_json);
  j["extra"].erase("served");
  nlohmann::json ella = nlohmann::json::object();
  for (const auto& m : method->modules()) {
    at::Tensor past = v1.tensors.at("served/" + m).sub(base->FindLinear(m)->weight).contiguous();
    v1.tensors.erase("served/" + m);
    auto module = EllaModule::FromPast(past, EllaOptions{0.7}, 2);
    ASSERT_TRUE(module.ok()) << module.status();
    module->ExportState("ella/" + m + "/", &v1.tensors);
    ella[m] = module->ConfigJson();
  }
  j["extra"]["ella"] = ella;
  v1.config_json = j.dump();

  auto restored = CreateMethodFromState(v1);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto rebuilt = base->ShallowCopy();
  ASSERT_TRUE((*restored)->ApplyServedWeights(rebuilt.get()).ok());
  EXPECT_LT(MaxDiff(Logits(*rebuilt), Logits(*served)), 1e-5);
  auto again = (*restored)->ExportState();  // not rewritten before a task
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->tensors.count("ella/" + method->modules().front() + "/w_past"));
  // The next task (penalty on the stored W_past) rewrites the state: served weights, no W_past.
  auto next = RunTask(**restored, *rebuilt, "c", 53);
  auto after = (*restored)->ExportState();
  ASSERT_TRUE(after.ok());
  for (const auto& [k, t] : after->tensors) EXPECT_NE(k.rfind("ella/", 0), 0u) << k;
  for (const auto& m : method->modules()) {
    EXPECT_TRUE(at::equal(after->tensors.at("served/" + m), next->FindLinear(m)->weight)) << m;
  }
}

// A Share state written before the Gram matrices were dropped (strata.share.v1: share/<m>/g_beta and
// g_alpha, float64) still loads; served and task-routed outputs equal the original method's, and
// the state is exported again without them.
TEST(MethodTest, LegacyShareV1StateWithGramMatricesLoadsAndRoutesTheSame) {
  auto base = TinyModel();
  auto method = MakeMethod("share_ella");
  std::unique_ptr<CausalLM> served = base->ShallowCopy();
  served = RunTask(*method, *served, "a", 61);
  served = RunTask(*method, *served, "b", 62);
  served = RunTask(*method, *served, "c", 63);
  auto state = method->ExportState();
  ASSERT_TRUE(state.ok());
  MethodState v1 = *state;
  nlohmann::json j = nlohmann::json::parse(v1.config_json);
  for (const auto& m : method->modules()) {
    const std::string prefix = "share/" + m + "/";
    EXPECT_EQ(v1.tensors.count(prefix + "g_beta") + v1.tensors.count(prefix + "g_alpha"), 0u) << m;
    for (const char* side : {"beta", "alpha"}) {
      at::Tensor e = v1.tensors.at(prefix + "e_" + side).to(at::kDouble);
      v1.tensors[prefix + "g_" + side] = e.mm(e.t()).contiguous();
    }
    std::string cfg = j["extra"]["share"][m].get<std::string>();
    const std::string v2 = "strata.share.v2";
    ASSERT_NE(cfg.find(v2), std::string::npos) << cfg;
    cfg.replace(cfg.find(v2), v2.size(), "strata.share.v1");
    j["extra"]["share"][m] = cfg;
  }
  v1.config_json = j.dump();

  auto restored = CreateMethodFromState(v1);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto rebuilt = base->ShallowCopy();
  ASSERT_TRUE((*restored)->ApplyServedWeights(rebuilt.get()).ok());
  EXPECT_TRUE(at::equal(Logits(*rebuilt), Logits(*served)));
  for (const std::string task : {"a", "b", "c"}) {
    auto want = served->ShallowCopy();
    auto got = rebuilt->ShallowCopy();
    ASSERT_TRUE(method->ApplyTaskRouting(task, want.get()).ok());
    ASSERT_TRUE((*restored)->ApplyTaskRouting(task, got.get()).ok());
    EXPECT_TRUE(at::equal(Logits(*got), Logits(*want))) << task;
  }
  auto again = (*restored)->ExportState();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->tensors.size(), state->tensors.size());
  for (const auto& [k, t] : state->tensors) EXPECT_TRUE(at::equal(again->tensors.at(k), t)) << k;
}

}  // namespace
}  // namespace strata
